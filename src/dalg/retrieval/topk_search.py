"""Exact top-k inner-product search on CPU: fp32 GEMM per database block and a running, thresholded top-k.

Per block of database rows: the stored rows (fp16 or fp32) are converted to fp32 into one reused buffer
(exact: fp16 values are fp32 values), one GEMM scores them against every query, and only the scores at or
above a query's current k-th best reach the merge, so the top-k bookkeeping touches ~``k * ln(n / k)`` items
per query instead of every score. Ties are broken by the lower database index.

The scores are fp32 GEMM results: equal to any other fp32 evaluation of the same products up to the
summation order's rounding (a few ulp, ~1e-7 for unit vectors in 512-d), which is the only place two fp32
rankings can differ (tests/test_retrieval_topk_search.py bounds it against float64).

Why not a bf16 GEMM filter with an exact re-score (experiments/bench/NOTES.md): a rigorous rounding bound for
bf16 inputs is ~0.012 for unit vectors, so the re-scored candidates stay at least ~k * ln(n / k) per query in a
stream, and re-scoring them pair by pair cost as much as the fp32 GEMM it saves on these CPUs.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

BLOCK_ROWS = 32768  # rows per task: read, scored and merged into the running top-k at once
SCORES_BYTES = 64 * 2**20  # per thread: a block's (rows, queries) fp32 scores stay below this
MAX_THREADS = 8  # default thread count cap: each thread holds a block (32 MiB of fp16 rows at 512-d)
PIECE = 4096  # rows per GEMM: converted to fp32 just before (8 MiB at 512-d, in cache); ~10% faster than 16k


class RunningTopK:
    """Per query, the best items so far by (score desc, index asc); items tied with the k-th are all kept."""

    def __init__(self, n_queries: int, k: int):
        self.k = k
        self.scores = np.full((n_queries, k), -np.inf, dtype=np.float32)
        self.ids = np.full((n_queries, k), -1, dtype=np.int64)
        self.kth = np.full(n_queries, -np.inf, dtype=np.float32)  # k-th best (-inf while fewer than k)

    def add(self, q: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> None:
        """Merge candidates ``(query q, database index ids, scores)``."""
        if q.size == 0:
            return
        nq = self.scores.shape[0]
        order = np.argsort(q, kind="stable")
        q, ids, scores = q[order], ids[order], scores[order]
        counts = np.bincount(q, minlength=nq)
        col = np.arange(q.size) - (np.cumsum(counts) - counts)[q]
        new_s = np.full((nq, int(counts.max())), -np.inf, dtype=np.float32)
        new_i = np.full(new_s.shape, -1, dtype=np.int64)
        new_s[q, col] = scores
        new_i[q, col] = ids
        cat_s = np.concatenate([self.scores, new_s], 1)
        cat_i = np.concatenate([self.ids, new_i], 1)
        kth = -np.partition(-cat_s, self.k - 1, axis=1)[:, self.k - 1]
        keep = (cat_s >= kth[:, None]) & (cat_i >= 0)  # ties with the k-th stay until the final index order
        width = max(self.k, int(keep.sum(1).max()))
        sel = np.argsort(~keep, axis=1, kind="stable")[:, :width]
        kept = np.take_along_axis(keep, sel, 1)
        self.scores = np.where(kept, np.take_along_axis(cat_s, sel, 1), np.float32(-np.inf))
        self.ids = np.where(kept, np.take_along_axis(cat_i, sel, 1), -1)
        self.kth = kth

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scores float32, ids int64)``, ``(n_queries, k)``, best first, ties by lower index."""
        order = np.lexsort((self.ids, -self.scores), axis=-1)[:, : self.k]
        return np.take_along_axis(self.scores, order, 1), np.take_along_axis(self.ids, order, 1)


@dataclass(frozen=True)
class Part:
    """One database part: ``rows`` (an array, or a memory map read with ``os.preadv`` from ``path``)."""

    rows: np.ndarray
    start: int  # global index of its first row
    where: str  # names the part in errors
    path: str | None = None  # the file behind a whole-file memory map
    offset: int = 0  # byte offset of row 0 in ``path``


def _openblas_thread_setter():
    """NumPy's bundled OpenBLAS ``openblas_set_num_threads_local`` (per calling thread), or None."""
    import ctypes
    import glob

    libs = glob.glob(os.path.join(os.path.dirname(np.__file__) + ".libs", "*openblas*.so*"))
    for lib in libs:
        try:
            fn = ctypes.CDLL(lib).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        return fn
    return None


class _Worker:
    """One thread's buffers: a block of raw rows, an fp32 piece of it, the block's scores."""

    def __init__(self, block_rows: int, dim: int, nq: int, single_blas: bool):
        import torch

        if single_blas and (setter := _openblas_thread_setter()) is not None:
            # one GEMM per thread: threads inside each GEMM only add spinning on an already busy machine
            setter(1)
        self.torch = torch
        self.f32 = torch.empty((min(PIECE, block_rows), dim), dtype=torch.float32)
        self.scores = np.empty((block_rows, nq), dtype=np.float32)
        self.raw: dict[np.dtype, np.ndarray] = {}

    def read(self, part: Part, s: int, e: int) -> np.ndarray:
        """Rows ``[s, e)`` of ``part`` as stored (fp16/fp32; other dtypes as fp32), C-contiguous."""
        dt = part.rows.dtype if part.rows.dtype in (np.float16, np.float32) else np.dtype(np.float32)
        raw = self.raw.get(dt)
        if raw is None:
            raw = self.raw[dt] = np.empty((self.scores.shape[0], part.rows.shape[1]), dtype=dt)
        raw = raw[: e - s]
        if part.path is None:
            block = part.rows[s:e]
            if block.dtype == dt and block.flags.c_contiguous and block.flags.writeable:
                return block  # torch reads it in place
            np.copyto(raw, block, casting="unsafe")  # read-only / other dtypes: torch wants a writable array
            return raw
        fd = os.open(part.path, os.O_RDONLY)
        try:  # plain reads: no page faults per 4 KiB page, no file pages counted in RSS
            view = memoryview(raw).cast("B")
            got = 0
            while got < view.nbytes:
                n = os.preadv(fd, [view[got:]], part.offset + s * raw.strides[0] + got)
                if n <= 0:
                    raise OSError(f"{part.path}: short read at row {s} ({got} of {view.nbytes} bytes)")
                got += n
        finally:
            os.close(fd)
        return raw

    def score(self, block: np.ndarray, q_t: np.ndarray) -> np.ndarray:
        """``block @ q_t`` in pieces of ``PIECE`` rows, each converted to fp32 just before its GEMM."""
        scores = self.scores[: block.shape[0]]
        src = self.torch.from_numpy(block)
        for s in range(0, block.shape[0], PIECE):
            e = min(s + PIECE, block.shape[0])
            piece = self.f32[: e - s]
            piece.copy_(src[s:e])  # fp16 -> fp32 is exact; torch's conversion is ~7x NumPy's
            np.matmul(piece.numpy(), q_t, out=scores[s:e])
        return scores


def _score_block(worker: _Worker, part: Part, s: int, e: int, q_t: np.ndarray, kth: np.ndarray, k: int):
    """Candidates of rows ``[s, e)``: scores at or above the query's running k-th best (or the block's own)."""
    block = worker.read(part, s, e)
    scores = worker.score(block, q_t)
    if not np.isfinite(scores).all():
        bad = np.flatnonzero(~np.isfinite(block).all(1))[:5]
        raise ValueError(
            f"{part.where}: database descriptors are not finite (NaN/inf), e.g. rows {(bad + s).tolist()}"
            if bad.size
            else f"{part.where}: inner products overflow float32 in rows {s}..{e - 1}"
        )
    missing = np.flatnonzero(kth == -np.inf)
    if missing.size and e - s > k:  # fewer than k so far: this block's own k-th best is a floor
        kth = kth.copy()
        kth[missing] = np.partition(scores[:, missing], e - s - k, axis=0)[e - s - k]
    r, q = np.nonzero(scores >= kth)
    return q, r + (part.start + s), scores[r, q]


def topk_search(
    queries: np.ndarray, parts: list[Part], k: int, block_rows: int = BLOCK_ROWS, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of ``queries`` (``(nq, dim)`` fp32) over database ``parts`` indexed one after the other.

    Returns ``(scores float32, ids int64)`` of shape ``(nq, k)``, best first, ties by lower index. Blocks of
    ``block_rows`` rows are scored by ``threads`` threads (default: the CPUs this process may use); each thread
    filters against the running k-th best it last saw (a stale floor only lets more candidates through).
    Raises ``ValueError`` naming the part and rows when database descriptors are not finite.
    """
    nq, dim = queries.shape
    q_t = np.ascontiguousarray(queries, dtype=np.float32).T  # (dim, nq): rows @ q_t
    threads = threads or min(MAX_THREADS, len(os.sched_getaffinity(0)))
    block_rows = max(1, min(block_rows, SCORES_BYTES // (4 * nq)))  # many queries: smaller blocks, same RAM
    tasks = [
        (p, s, min(s + block_rows, p.rows.shape[0]))
        for p in parts
        for s in range(0, p.rows.shape[0], block_rows)
    ]
    top = RunningTopK(nq, k)
    local = threading.local()

    def run(task):  # in a pool thread: its own buffers and a single-threaded BLAS
        worker = getattr(local, "worker", None)
        if worker is None:
            worker = local.worker = _Worker(block_rows, dim, nq, single_blas=True)
        return _score_block(worker, *task, q_t, top.kth, k)

    if threads <= 1 or len(tasks) <= 1:
        worker = _Worker(block_rows, dim, nq, single_blas=False)
        for t in tasks:
            top.add(*_score_block(worker, *t, q_t, top.kth, k))
        return top.result()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dalg-topk") as pool:
        pending = deque()
        for t in tasks:
            pending.append(pool.submit(run, t))
            if len(pending) > threads:  # bounded: results are merged (and the floor raised) as they come
                top.add(*pending.popleft().result())
        while pending:
            top.add(*pending.popleft().result())
    return top.result()
