"""torchmetrics wrapper of the revisited evaluation, correct under DDP.

Each process ``update``s with the descriptors of the images it saw and their dataset indices (queries first,
then database images, as ``dalg.data.revisited.RevisitedImages`` orders them). ``compute`` gathers every
process's state (torchmetrics ``dist_reduce_fx="cat"``), puts the descriptors back in dataset order, drops the
duplicates that ``DistributedSampler`` pads the last batch with, refuses to score if any image is missing,
then runs :func:`dalg.retrieval.index.search` and :func:`dalg.retrieval.metrics.evaluate_revisited`.

The state is one flat float32 tensor of ``[index, descriptor...]`` rows: a flat list state survives ranks
that received no data (torchmetrics then contributes an empty 1-D tensor), and float32 holds indices
exactly below 2**24.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from dalg.retrieval.index import search
from dalg.retrieval.metrics import RevisitedScores, evaluate_revisited

_MAX_EXACT_INDEX = 1 << 24


def assemble_by_index(
    index: np.ndarray | torch.Tensor, desc: np.ndarray | torch.Tensor, n: int
) -> np.ndarray:
    """Descriptors in dataset order ``0..n-1`` from (index, descriptor) pairs gathered from all processes.

    Repeated indices (a ``DistributedSampler`` pads with repeats) keep their first occurrence; an index
    outside ``[0, n)`` or any missing index raises, naming them.
    """
    index = index.cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
    desc = desc.cpu().numpy() if isinstance(desc, torch.Tensor) else np.asarray(desc)
    index = index.astype(np.int64).reshape(-1)
    if desc.ndim != 2 or desc.shape[0] != index.shape[0]:
        raise ValueError(f"{index.shape[0]} indices but descriptors of shape {desc.shape}")
    bad = (index < 0) | (index >= n)
    if bad.any():
        raise ValueError(f"dataset indices outside [0, {n}): {np.unique(index[bad])[:5].tolist()}")
    uniq, first = np.unique(index, return_index=True)
    if uniq.size != n:
        missing = np.setdiff1d(np.arange(n), uniq)
        raise RuntimeError(
            f"descriptors missing for {missing.size} of {n} images (first indices {missing[:5].tolist()})"
        )
    return np.ascontiguousarray(desc[first], dtype=np.float32)  # np.unique sorts: row i is index i


class RevisitedRetrievalMetric(Metric):
    """Revisited mAP (E/M/H) and mP@k of one Revisited-format set; ``compute`` returns ``{"mAP_E": ..}``."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        gnd: Sequence[Mapping],
        n_database: int,
        dim: int,
        kappas: Sequence[int] = (1, 5, 10),
        k: int | None = None,
        chunk_size: int = 65536,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.gnd = list(gnd)
        self.n_queries = len(self.gnd)
        self.n_database = int(n_database)
        self.dim = int(dim)
        self.kappas = tuple(kappas)
        self.k = k
        self.chunk_size = chunk_size
        if self.n_queries + self.n_database >= _MAX_EXACT_INDEX:
            raise ValueError(f"{self.n_queries + self.n_database} images: indices beyond 2**24 are not exact")
        self.add_state("rows", default=[], dist_reduce_fx="cat")
        self.last_scores: RevisitedScores | None = None
        self.last_ranks: np.ndarray | None = None
        self.last_features: np.ndarray | None = None

    def update(self, descriptors: torch.Tensor, indices: torch.Tensor) -> None:
        if descriptors.ndim != 2 or descriptors.shape[1] != self.dim:
            raise ValueError(f"descriptors must be (batch, {self.dim}), got {tuple(descriptors.shape)}")
        if indices.shape[0] != descriptors.shape[0]:
            raise ValueError(f"{indices.shape[0]} indices for {descriptors.shape[0]} descriptors")
        rows = torch.cat([indices.detach().float().reshape(-1, 1), descriptors.detach().float()], dim=1)
        self.rows.append(rows.reshape(-1))

    def compute(self) -> dict[str, torch.Tensor]:
        flat = dim_zero_cat(self.rows) if len(self.rows) else torch.zeros(0)
        rows = flat.reshape(-1, 1 + self.dim)
        n = self.n_queries + self.n_database
        feats = assemble_by_index(rows[:, 0].round().long(), rows[:, 1:], n)
        _, ranks = search(
            feats[: self.n_queries], feats[self.n_queries :], self.k, chunk_size=self.chunk_size
        )
        scores = evaluate_revisited(ranks, self.gnd, self.kappas, n_database=self.n_database)
        self.last_scores, self.last_ranks, self.last_features = scores, ranks, feats
        return {key: torch.tensor(value, dtype=torch.float64) for key, value in scores.as_dict().items()}
