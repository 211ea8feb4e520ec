"""Blocked fp32 top-k search (dalg.retrieval.topk_search): equal to a float64 ranking up to fp32 rounding of
near-ties, ties by lower index across blocks and threads, fp16 files read in place, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dalg.retrieval.index import search
from dalg.retrieval.topk_search import Part, RunningTopK, topk_search

# Two fp32 evaluations of the same 512-d inner products of unit vectors differ by a few ulp (~1e-7): places
# where the ranking differs from float64 must hold scores at least this close (the documented tolerance).
NEAR_TIE = 1e-6


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _float64_topk(q: np.ndarray, db: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = q.astype(np.float64) @ db.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(np.arange(s.shape[1]), s.shape), -s), axis=-1)[:, :k]
    return s, order


def _assert_equal_up_to_near_ties(ids: np.ndarray, q: np.ndarray, db: np.ndarray) -> None:
    s64, ref = _float64_topk(q, db, ids.shape[1])
    diff = ids != ref
    if diff.any():
        rows = np.nonzero(diff)[0]
        gap = np.abs(s64[rows, ids[diff]] - s64[rows, ref[diff]])
        assert gap.max() <= NEAR_TIE, f"ranking differs from float64 beyond fp32 rounding: {gap.max()}"
    assert diff.mean() < 0.01  # near-ties are rare in random data


@pytest.mark.parametrize("block_rows,threads", [(7, 1), (64, 2), (4096, 2), (100_000, 1)])
@pytest.mark.parametrize("k", [1, 50, 300])
def test_equals_float64_ranking(block_rows: int, threads: int, k: int) -> None:
    rng = np.random.default_rng(k + block_rows)
    db, q = _unit(rng, 1500, 64), _unit(rng, 12, 64)
    scores, ids = topk_search(q, [Part(db, 0, "db")], k, block_rows=block_rows, threads=threads)
    assert ids.shape == scores.shape == (12, k) and ids.dtype == np.int64 and scores.dtype == np.float32
    _assert_equal_up_to_near_ties(ids, q, db)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ db.T, ids, 1), atol=1e-6)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_fp16_file_read_in_place_equals_in_memory(tmp_path) -> None:
    rng = np.random.default_rng(5)
    own, dis, q = _unit(rng, 300, 32), _unit(rng, 5000, 32).astype(np.float16), _unit(rng, 9, 32)
    path = tmp_path / "dis.npy"
    np.save(path, dis)
    mm = np.load(path, mmap_mode="r")
    file_part = Part(mm, 300, str(path), path=str(path), offset=int(mm.offset))
    by_file = topk_search(q, [Part(own, 0, "own"), file_part], 40, block_rows=1000, threads=2)
    in_memory = topk_search(q, [Part(own, 0, "own"), Part(dis, 300, "dis")], 40, block_rows=1000, threads=1)
    np.testing.assert_array_equal(by_file[1], in_memory[1])
    np.testing.assert_array_equal(by_file[0], in_memory[0])
    _assert_equal_up_to_near_ties(by_file[1], q, np.concatenate([own, dis.astype(np.float32)]))


def test_search_on_a_1m_shaped_problem_is_exact_up_to_near_ties(tmp_path) -> None:
    # the benchmark's shape scaled down: ground truth in memory, then an fp16 memory map, top-k across both
    rng = np.random.default_rng(6)
    gt, dis, q = _unit(rng, 500, 128).astype(np.float16), _unit(rng, 40_000, 128).astype(np.float16), None
    q = _unit(rng, 20, 128)
    np.save(tmp_path / "d.npy", dis)
    scores, ids = search(q, [gt, np.load(tmp_path / "d.npy", mmap_mode="r")], 200, chunk_size=8192)
    _assert_equal_up_to_near_ties(ids, q, np.concatenate([gt, dis]).astype(np.float32))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 300),
    k=st.integers(1, 60),
    block=st.integers(1, 50),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**31),
)
def test_ties_by_lower_index_across_blocks_and_threads(n, k, block, threads, seed) -> None:
    rng = np.random.default_rng(seed)
    k = min(k, n)
    protos = np.eye(4, dtype=np.float32)
    db = protos[rng.integers(0, 4, size=n)]  # few distinct rows: many exact ties, across block boundaries
    q = protos[rng.integers(0, 4, size=3)] * np.float32(0.5)
    _, ids = topk_search(q, [Part(db, 0, "db")], k, block_rows=block, threads=threads)
    s = q @ db.T
    np.testing.assert_array_equal(ids, np.argsort(-s, axis=1, kind="stable")[:, :k])


def test_running_topk_merges_like_a_sort() -> None:
    rng = np.random.default_rng(7)
    nq, k = 4, 10
    top = RunningTopK(nq, k)
    all_q, all_i, all_s = [], [], []
    start = 0
    for _ in range(12):  # batches of candidates, values on a coarse grid: ties inside and across batches
        m = int(rng.integers(0, 30))
        q = rng.integers(0, nq, m)
        ids = start + np.arange(m)
        s = (rng.integers(0, 8, m) / 8).astype(np.float32)
        start += m
        top.add(q, ids, s)
        all_q.append(q), all_i.append(ids), all_s.append(s)
    scores, ids = top.result()
    q, i, s = (np.concatenate(x) for x in (all_q, all_i, all_s))
    for r in range(nq):
        sel = q == r
        order = np.lexsort((i[sel], -s[sel]))[:k]
        n = order.size
        np.testing.assert_array_equal(ids[r, :n], i[sel][order])
        np.testing.assert_array_equal(scores[r, :n], s[sel][order])
        assert (ids[r, n:] == -1).all()


def test_non_finite_rows_name_the_file_and_row(tmp_path) -> None:
    db = np.ones((50, 8), np.float16)
    db[37, 1] = np.inf
    path = tmp_path / "bad.npy"
    np.save(path, db)
    mm = np.load(path, mmap_mode="r")
    q = np.ones((2, 8), np.float32)
    with pytest.raises(ValueError, match=r"bad\.npy.*not finite.*\[37\]"):
        search(q, [np.ones((3, 8), np.float32), mm], 5, chunk_size=16)


def test_many_queries_use_smaller_blocks(monkeypatch) -> None:
    import dalg.retrieval.topk_search as ts

    monkeypatch.setattr(ts, "SCORES_BYTES", 4 * 300 * 8)  # 8 rows of 300 queries' scores per block
    seen = []
    real = ts._score_block
    monkeypatch.setattr(
        ts, "_score_block", lambda w, part, s, e, *a: seen.append(e - s) or real(w, part, s, e, *a)
    )
    rng = np.random.default_rng(8)
    db, q = _unit(rng, 100, 16), _unit(rng, 300, 16)
    _, ids = topk_search(q, [Part(db, 0, "db")], 5, threads=1)
    assert max(seen) == 8 and sum(seen) == 100
    _assert_equal_up_to_near_ties(ids, q, db)
