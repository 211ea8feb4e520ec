"""DDP (2 CPU processes, gloo): descriptors gathered from 2 processes equal those of 1, scores too.

Covers the evaluation engine's gather (``gather_by_index``) and scoring, with the padding ``DistributedSampler``
adds (49 images on 2 processes) and with a process that extracted nothing.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from dalg.retrieval.evaluation import rank_and_score
from dalg.retrieval.gather import assemble_by_index, gather_by_index

N_QUERIES, N_DB, DIM = 5, 44, 16  # 49 images: an odd count, so DistributedSampler pads


def _descriptors(index: torch.Tensor) -> torch.Tensor:
    # a deterministic "model": descriptor is a function of the dataset index only
    g = torch.Generator().manual_seed(1234)
    table = torch.nn.functional.normalize(torch.randn(N_QUERIES + N_DB, DIM, generator=g), dim=1)
    return table[index]


def _gnd() -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(N_QUERIES):
        p = rng.permutation(N_DB)
        out.append({"easy": p[:3].tolist(), "hard": p[3:6].tolist(), "junk": p[6:8].tolist(), "bbx": None})
    return out


def _scores(feats: np.ndarray) -> dict[str, float]:
    return rank_and_score(feats[:N_QUERIES], feats[N_QUERIES:], _gnd())[0].as_dict()


def _worker(rank: int, world: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        # 49 images on 2 processes: the sampler pads rank 1 with a repeat of an image rank 0 also sees
        sampler = DistributedSampler(
            range(N_QUERIES + N_DB), num_replicas=world, rank=rank, shuffle=True, seed=3
        )
        idx = torch.tensor(list(sampler))
        assert len(idx) == (N_QUERIES + N_DB + 1) // 2
        # batches of 7 in a shuffled order, as a validation loop hands them over
        batches = torch.split(idx, 7)
        index = torch.cat(batches)
        desc = torch.cat([_descriptors(b) for b in batches])
        feats = gather_by_index(index, desc, N_QUERIES + N_DB)
        result = _scores(feats)
        np.save(f"{tmp}/cb_{rank}.npy", feats)
        # a set that only rank 0 extracted
        only0 = torch.arange(N_QUERIES + N_DB) if rank == 0 else torch.zeros(0, dtype=torch.long)
        desc0 = _descriptors(only0) if rank == 0 else torch.zeros(0, 1)
        np.save(f"{tmp}/cb_only0_{rank}.npy", gather_by_index(only0, desc0, N_QUERIES + N_DB))
        with open(f"{tmp}/scores_{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _spawn_two(worker, tmp_path) -> None:
    """Run ``worker(rank, 2, tmp)`` in 2 processes. fork: CPU only, nothing CUDA initialised; avoids re-importing
    torch in each child (seconds, not tens)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(worker, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="fork")


@pytest.mark.timeout(120)
def test_two_gloo_processes_match_one(tmp_path) -> None:
    _spawn_two(_worker, tmp_path)
    single = gather_by_index(torch.arange(N_QUERIES + N_DB), _descriptors(torch.arange(N_QUERIES + N_DB)), 49)
    expected = _scores(single)
    for rank in range(2):
        assert json.loads((tmp_path / f"scores_{rank}.json").read_text()) == expected
        np.testing.assert_array_equal(np.load(tmp_path / f"cb_{rank}.npy"), single)
        np.testing.assert_array_equal(np.load(tmp_path / f"cb_only0_{rank}.npy"), single)
    np.testing.assert_array_equal(single, _descriptors(torch.arange(N_QUERIES + N_DB)).numpy())


def test_assemble_by_index_dedupes_and_reports_missing() -> None:
    desc = np.arange(8, dtype=np.float32).reshape(4, 2)
    out = assemble_by_index(np.array([2, 0, 1, 0]), desc, 3)  # index 0 padded twice
    np.testing.assert_array_equal(out, desc[[1, 2, 0]])
    with pytest.raises(RuntimeError, match="missing for 1 of 4"):
        assemble_by_index(np.array([2, 0, 1]), desc[:3], 4)
    with pytest.raises(ValueError, match="outside"):
        assemble_by_index(np.array([5]), desc[:1], 3)


class _Strategy:
    def broadcast(self, obj, src: int = 0):
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]


class _Trainer:
    """The two things RetrievalEvalCallback._rank_and_score_once reads of a Lightning trainer under DDP."""

    def __init__(self) -> None:
        self.is_global_zero = dist.get_rank() == 0
        self.world_size = dist.get_world_size()
        self.strategy = _Strategy()


def _score_once_worker(rank: int, world: int, tmp: str) -> None:
    import dalg.retrieval.callback as cb

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous2", rank=rank, world_size=world)
    try:
        calls = []
        real = cb.rank_and_score
        cb.rank_and_score = lambda *a, **k: calls.append(1) or real(*a, **k)
        callback = cb.RetrievalEvalCallback(grid_queries=0)
        feats = _descriptors(torch.arange(N_QUERIES + N_DB)).numpy()
        scores, ranks, protocol = callback._rank_and_score_once(_Trainer(), feats, N_QUERIES, _gnd())
        out = {
            "scores": scores.as_dict(),
            "protocol": protocol,
            "ranks": ranks is not None,
            "calls": len(calls),
        }

        # an error on rank 0 reaches every process instead of leaving the others in the broadcast
        def broken(*args, **kwargs):
            raise ValueError("broken search on rank 0")

        cb.rank_and_score = broken
        try:
            callback._rank_and_score_once(_Trainer(), feats, N_QUERIES, _gnd())
        except ValueError as e:
            out["error"] = str(e)
        with open(f"{tmp}/once_{rank}.json", "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_callback_searches_on_rank_zero_only_and_shares_scores(tmp_path) -> None:
    _spawn_two(_score_once_worker, tmp_path)
    r0, r1 = (json.loads((tmp_path / f"once_{r}.json").read_text()) for r in range(2))
    assert r0["calls"] == 1 and r1["calls"] == 0  # one search, on rank 0
    assert r0["scores"] == r1["scores"] and r0["protocol"] == r1["protocol"]
    assert r0["ranks"] is True and r1["ranks"] is False  # only rank 0 draws grids
    assert r0["error"] == r1["error"] == "broken search on rank 0"
