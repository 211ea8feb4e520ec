"""Exact inner-product search over L2-normalised descriptors, chunked over the database.

CPU top-k: ``dalg.retrieval.topk_search`` (fp32 GEMM per block in threads, thresholded running top-k; equal to
any fp32 ranking up to the rounding of near-ties, ~1e-7). GPU top-k: FAISS ``IndexFlatIP``. Full rankings and
similarity matrices: BLAS products per chunk.

Tie-breaking (documented contract): items with equal similarity are ranked by ascending database index.
This holds for full rankings (``k=None``) and for top-k rankings, including ties straddling the k-th
place (a query whose k-th and (k+1)-th FAISS scores are equal is re-selected exactly in NumPy).

Memory: the database (an array or a ``np.memmap`` in fp16/fp32) is read ``chunk_size`` rows at a time and
converted to fp32 chunk by chunk; only the running ``(n_queries, k)`` top-k lists are kept, so RAM stays
bounded by ``chunk_size * dim * 4`` bytes plus the results, whatever the database size.

GPU: with ``use_gpu=None`` FAISS runs on the GPU(s) when FAISS was built with GPU support and a GPU is
visible (``pip install dalg[gpu]``); with several GPUs the chunk is sharded across them
(``index_cpu_to_all_gpus(shard=True)``). FAISS GPU top-k is limited to k <= 2048; larger k runs on CPU.
"""

from __future__ import annotations

import functools
import logging
import mmap
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from dalg.retrieval.row_buckets import top_k
from dalg.retrieval.topk_search import BLOCK_ROWS, Part, topk_search

log = logging.getLogger(__name__)

_GPU_MAX_K = 2048


def rank_by_similarity(sim: np.ndarray) -> np.ndarray:
    """Full ranking of a ``(n_queries, n_database)`` similarity matrix, best first, ties by lower index.

    NumPy's default (SIMD) argsort is several times faster than its stable sort but orders equal values
    arbitrarily; runs of equal scores (common in float32 at a few thousand images per row) are then put in
    index order, so the result always equals the stable order. Rows with NaN use the stable sort directly.
    """
    sim = np.asarray(sim)
    if sim.ndim != 2:
        raise ValueError(f"similarity must be (n_queries, n_database), got shape {sim.shape}")
    neg = -sim
    order = np.argsort(neg, axis=1)
    ordered = np.take_along_axis(neg, order, 1)
    nan_rows = np.flatnonzero(np.isnan(ordered[:, -1]))  # NaN sorts last
    if nan_rows.size:
        order[nan_rows] = np.argsort(neg[nan_rows], axis=1, kind="stable")
        ordered[nan_rows] = np.arange(ordered.shape[1])  # distinct values: no tie repair in these rows
    eq = ordered[:, 1:] == ordered[:, :-1]  # eq[r, c]: places c and c+1 of row r hold equal scores
    if eq.any():
        prev_eq = np.zeros(order.shape, dtype=bool)
        prev_eq[:, 1:] = eq  # equal to the previous place
        in_run = prev_eq.copy()
        in_run[:, :-1] |= eq
        places = np.flatnonzero(in_run)  # row-major: runs are contiguous and never cross rows
        run_id = np.cumsum(~prev_eq.ravel()[places])  # a run starts where a place differs from the previous
        flat = order.reshape(-1)
        idx = flat[places]
        flat[places] = idx[np.lexsort((idx, run_id))]
    return order


def _sort_candidates(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, order candidates by (score desc, index asc) and keep the first k."""
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def _exact_topk_row(sim_row: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of one similarity row with ties broken by lower index (threshold selection, O(n))."""
    n = sim_row.shape[0]
    if k >= n:
        idx = np.argsort(-sim_row, kind="stable")
        return sim_row[idx], idx
    kth = np.partition(sim_row, n - k)[n - k]  # k-th largest value
    above = np.flatnonzero(sim_row > kth)
    tied = np.flatnonzero(sim_row == kth)[: k - above.size]
    idx = np.concatenate([above, tied])
    s, i = _sort_candidates(sim_row[idx][None], idx[None], k)
    return s[0], i[0]


def faiss_gpu_count() -> int:
    """Number of GPUs FAISS can use (0 with faiss-cpu or without CUDA)."""
    try:
        import faiss
    except ImportError:
        return 0
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


class _FlatIP:
    """An IndexFlatIP on CPU, one GPU or sharded across all GPUs; reset and refilled per chunk."""

    def __init__(self, dim: int, use_gpu: bool):
        import faiss

        self.faiss = faiss
        cpu = faiss.IndexFlatIP(dim)
        self.gpu = use_gpu
        if not use_gpu:
            self.index = cpu
            return
        n = faiss.get_num_gpus()
        if n > 1:
            co = faiss.GpuMultipleClonerOptions()
            co.shard = True
            self.index = faiss.index_cpu_to_all_gpus(cpu, co=co)
        else:
            self._res = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self._res, 0, cpu)

    def search(self, chunk: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self.index.reset()
        self.index.add(chunk)
        scores, ids = self.index.search(queries, k)
        self.index.reset()
        return scores, ids


Database = np.ndarray | Sequence[np.ndarray]


def database_parts(database: Database) -> list[np.ndarray]:
    """A database given as one array or as parts (e.g. a set's own images, then +1M distractors)."""
    parts = [database] if isinstance(database, np.ndarray) else list(database)
    if not parts:
        raise ValueError("the database is empty (no parts)")
    for t, p in enumerate(parts):
        if not isinstance(p, np.ndarray) or p.ndim != 2:
            raise ValueError(
                f"database part {t} must be a 2-D array, got {type(p).__name__} {getattr(p, 'shape', '')}"
            )
        if p.shape[1] != parts[0].shape[1]:
            raise ValueError(f"database part {t} is {p.shape[1]}-d, part 0 is {parts[0].shape[1]}-d")
    return parts


def take_rows(database: Database, indices: np.ndarray) -> np.ndarray:
    """fp32 rows at global ``indices`` (any shape) of a database given as one array or as parts."""
    parts = database_parts(database)
    indices = np.asarray(indices, dtype=np.int64)
    uniq, inv = np.unique(indices, return_inverse=True)  # sorted: each row read once, memmap friendly
    n_db = sum(p.shape[0] for p in parts)
    if uniq.size and (uniq[0] < 0 or uniq[-1] >= n_db):
        raise IndexError(f"database indices outside [0, {n_db}): {uniq[0]}..{uniq[-1]}")
    out = np.empty((uniq.size, parts[0].shape[1]), dtype=np.float32)
    offset = 0
    for p in parts:
        sel = (uniq >= offset) & (uniq < offset + p.shape[0])
        if sel.any():
            out[sel] = p[uniq[sel] - offset]
        offset += p.shape[0]
    return out[inv.reshape(indices.shape)]


def _validate(queries: np.ndarray, parts: list[np.ndarray]) -> int:
    if queries.ndim != 2:
        raise ValueError(f"queries must be 2-D, got {queries.shape}")
    if queries.shape[1] != parts[0].shape[1]:
        raise ValueError(
            f"descriptor dimension mismatch: queries {queries.shape[1]}-d, database {parts[0].shape[1]}-d"
        )
    n_db = sum(int(p.shape[0]) for p in parts)
    if n_db == 0:
        raise ValueError("the database is empty")
    return n_db


def _prepare(
    queries: np.ndarray, database: Database, chunk_size: int
) -> tuple[np.ndarray, list[np.ndarray], int]:
    """Float32 contiguous queries, the database parts and their total size, after the checks every search
    shares (shapes, finite queries, a positive chunk size)."""
    queries = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
    parts = database_parts(database)
    n_db = _validate(queries, parts)
    if not np.isfinite(queries).all():
        bad = np.flatnonzero(~np.isfinite(queries).all(1))
        raise ValueError(
            f"{bad.size} query descriptors are not finite (NaN/inf), e.g. rows {bad[:5].tolist()}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return queries, parts, n_db


def _iter_chunks(
    parts: list[np.ndarray], chunk_size: int, check: bool = True
) -> Iterator[tuple[int, np.ndarray, Callable[[], None]]]:
    """(global start row, fp32 chunk, finiteness check) over all parts in order; a chunk never spans two parts.

    With ``check`` the chunk is checked before it is yielded; without, the caller runs the returned check when
    it needs to (e.g. only when a product of the chunk is not finite: a pass over 70 products per row instead
    of 512 values)."""
    offset = 0
    for part_no, p in enumerate(parts):
        reader = _ChunkReader(p)
        try:
            for start in range(0, p.shape[0], chunk_size):
                stop = min(start + chunk_size, p.shape[0])
                chunk = reader.read(start, stop)
                where = getattr(p, "filename", None) or f"database part {part_no}"
                check_chunk = functools.partial(_check_finite_chunk, chunk, start, where)
                if check:
                    check_chunk()
                yield offset + start, chunk, check_chunk
        finally:
            reader.close()
        offset += p.shape[0]


def _check_finite_chunk(chunk: np.ndarray, start: int, where: str) -> None:
    if not np.isfinite(chunk).all():
        bad = np.flatnonzero(~np.isfinite(chunk).all(1))[:5] + start
        raise ValueError(f"{where}: database descriptors are not finite (NaN/inf), e.g. rows {bad.tolist()}")


class _ChunkReader:
    """Reads database rows ``[start, stop)`` as fp32.

    A memory map opened by ``np.load(mmap_mode="r")`` / ``np.memmap`` is read with plain file reads into a
    fresh buffer: no page faults per 4 KiB page, and the file's pages never count in this process's RSS.
    Anything else (arrays, sliced memory maps) is sliced.
    """

    def __init__(self, database: np.ndarray):
        self.database = database
        self._file = None
        if (
            isinstance(database, np.memmap)
            and isinstance(database.base, mmap.mmap)  # the original map: .offset is the file offset
            and database.filename is not None
            and database.flags.c_contiguous
        ):
            self._file = open(database.filename, "rb")  # closed in close()
            self._row_bytes = database.dtype.itemsize * database.shape[1]

    def read(self, start: int, stop: int) -> np.ndarray:
        if self._file is None:
            chunk = np.ascontiguousarray(self.database[start:stop], dtype=np.float32)
            _release_pages(self.database, start, stop)
            return chunk
        raw = np.empty((stop - start, self.database.shape[1]), dtype=self.database.dtype)
        self._file.seek(self.database.offset + start * self._row_bytes)
        n = self._file.readinto(memoryview(raw).cast("B"))
        if n != raw.nbytes:
            raise OSError(f"{self.database.filename}: short read at row {start} ({n} of {raw.nbytes} bytes)")
        return raw.astype(np.float32, copy=False)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class _FaissBlasSettings:
    """Use FAISS's BLAS path for every query count, in large database blocks (restored afterwards).

    FAISS only switches to BLAS above ``distance_compute_blas_threshold`` (nq x nb products in recent
    versions); below it, and with its default 1024-row blocks, 70 queries x 65k rows ran ~5x slower on CPU
    than with BLAS over 16k-row blocks (benchmarks/bench_search_1m.py).
    """

    def __init__(self, faiss_module):
        self.cvar = getattr(faiss_module, "cvar", None)

    def __enter__(self) -> None:
        if self.cvar is None:
            return
        self.saved = (self.cvar.distance_compute_blas_threshold, self.cvar.distance_compute_blas_database_bs)
        self.cvar.distance_compute_blas_threshold = 1
        self.cvar.distance_compute_blas_database_bs = max(self.saved[1], 16384)

    def __exit__(self, *exc) -> None:
        if self.cvar is not None:
            self.cvar.distance_compute_blas_threshold, self.cvar.distance_compute_blas_database_bs = (
                self.saved
            )


def _topk_parts(parts: list[np.ndarray]) -> list[Part]:
    """The database parts as topk_search reads them: a whole-file memory map by plain file reads."""
    out, offset = [], 0
    for t, p in enumerate(parts):
        if (
            isinstance(p, np.memmap)
            and isinstance(p.base, mmap.mmap)  # the original map: .offset is the file offset
            and p.filename is not None
            and p.flags.c_contiguous
            and p.dtype in (np.float16, np.float32)
        ):
            out.append(Part(p, offset, str(p.filename), path=str(p.filename), offset=int(p.offset)))
        else:
            out.append(Part(p, offset, getattr(p, "filename", None) or f"database part {t}"))
        offset += p.shape[0]
    return out


def _release_pages(database: np.ndarray, start: int, stop: int) -> None:
    """Tell the kernel we are done with the pages of a memory-mapped chunk, so RSS stays bounded."""
    mm = getattr(database, "_mmap", None)
    if not isinstance(database, np.memmap) or mm is None or not hasattr(mm, "madvise"):
        return
    row = database.strides[0]
    begin = database.offset + start * row
    end = database.offset + stop * row
    page = mmap.PAGESIZE
    begin_aligned = (begin // page) * page
    try:
        mm.madvise(mmap.MADV_DONTNEED, begin_aligned, end - begin_aligned)
    except (OSError, ValueError, AttributeError):  # not fatal: only a memory hint
        pass


def search(
    queries: np.ndarray,
    database: Database,
    k: int | None = None,
    *,
    chunk_size: int = 65536,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product search; returns ``(scores (nq, k) float32, ranks (nq, k) int64)``, best first.

    ``k=None`` gives the full ranking (exhaustive similarity, stable sort). Ties are broken by the lower
    database index. ``database`` is an array, a ``np.memmap`` (fp16 or fp32), or a sequence of them indexed
    one after the other (a set's own images, then a distractor file); it is read ``chunk_size`` rows at a time.
    """
    queries, parts, n_db = _prepare(queries, database, chunk_size)
    full = k is None
    k = n_db if k is None else int(k)
    if not 1 <= k <= n_db:
        raise ValueError(f"k must be in [1, {n_db}] (database size), got {k}")
    nq = queries.shape[0]

    if full:
        return _full_ranking(queries, parts, n_db, chunk_size)

    n_gpu = faiss_gpu_count()
    if use_gpu is None:
        use_gpu = n_gpu > 0
    if use_gpu and n_gpu == 0:
        raise RuntimeError("use_gpu=True but FAISS sees no GPU (faiss-cpu installed or no CUDA device)")
    if use_gpu and k > _GPU_MAX_K:
        warnings.warn(f"k={k} exceeds FAISS GPU's limit of {_GPU_MAX_K}; searching on CPU", stacklevel=2)
        use_gpu = False
    if not use_gpu:  # CPU: blocked fp32 GEMM in threads with a thresholded running top-k (topk_search.py)
        return topk_search(queries, _topk_parts(parts), k, block_rows=min(chunk_size, BLOCK_ROWS))
    index = _FlatIP(queries.shape[1], use_gpu)

    best_s = np.full((nq, 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((nq, 0), dtype=np.int64)
    with _FaissBlasSettings(index.faiss):
        for start, chunk, _ in _iter_chunks(parts, chunk_size):
            kc = min(k + 1, chunk.shape[0])  # one extra to detect ties straddling the k-th place
            s, i = index.search(chunk, queries, kc)
            if kc > k:
                tie = s[:, k - 1] == s[:, k]
                s, i = s[:, :k].copy(), i[:, :k].copy()
                for q in np.flatnonzero(tie):  # rare: duplicate descriptors; re-select exactly
                    s[q], i[q] = _exact_topk_row(chunk @ queries[q], k)
            i = i.astype(np.int64) + start
            cat_s, cat_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i], 1)
            best_s, best_i = _sort_candidates(cat_s, cat_i, k)
            del chunk
    return best_s.astype(np.float32, copy=False), best_i


# similarities, their negation and sorted copy (fp32), the int64 order, the returned scores, tie masks
_FULL_RANKING_BYTES_PER_CELL = 4 + 4 + 4 + 8 + 4 + 3


def _available_memory() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _check_full_fits(nq: int, n_db: int, bytes_per_cell: int) -> None:
    need = nq * n_db * bytes_per_cell
    available = _available_memory()
    if available is not None and need > available:
        raise MemoryError(
            f"a full ranking of {nq:,} queries x {n_db:,} images needs ~{need / 2**30:.1f} GiB, "
            f"only {available / 2**30:.1f} GiB is available: ask for the top-k instead (search(..., k=...), "
            "eval.py ranking.top_k=...)"
        )


def similarity_matrix(queries: np.ndarray, database: Database, chunk_size: int = 65536) -> np.ndarray:
    """Exact ``(n_queries, n_database)`` float32 inner products, the database read ``chunk_size`` rows at a time.

    This is what a full ranking is scored from (``metrics.evaluate_revisited_from_similarity`` needs no argsort);
    a plain BLAS product in chunks is as fast as FAISS's flat index here and keeps every score.
    """
    queries, parts, n_db = _prepare(queries, database, chunk_size)
    _check_full_fits(queries.shape[0], n_db, 4)
    sim = np.empty((queries.shape[0], n_db), dtype=np.float32)
    for start, chunk, check_chunk in _iter_chunks(parts, chunk_size, check=False):
        block = sim[:, start : start + chunk.shape[0]]
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below, with a clearer message
            np.matmul(queries, chunk.T, out=block)
        if not np.isfinite(
            block
        ).all():  # a NaN/inf descriptor makes its products NaN/inf (queries are finite)
            check_chunk()
            raise ValueError(
                f"similarities of database rows {start}..{start + chunk.shape[0] - 1} overflow float32 "
                "(descriptors with huge values: not L2-normalised?)"
            )
    return sim


def topk_from_similarity(sim: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` columns of ``rank_by_similarity(sim)`` (ties by lower index), without a full sort."""
    sim = np.asarray(sim)
    if min(int(k), sim.shape[1]) >= sim.shape[1]:
        return rank_by_similarity(sim).astype(np.int64, copy=False)
    return top_k(sim, k)


def _full_ranking(
    queries: np.ndarray, parts: list[np.ndarray], n_db: int, chunk_size: int
) -> tuple[np.ndarray, np.ndarray]:
    _check_full_fits(queries.shape[0], n_db, _FULL_RANKING_BYTES_PER_CELL)
    sim = similarity_matrix(queries, parts, chunk_size)
    ranks = rank_by_similarity(sim)
    return np.take_along_axis(sim, ranks, 1), ranks.astype(np.int64, copy=False)
