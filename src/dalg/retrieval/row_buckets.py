"""Positions and top-k in the rows of a similarity matrix without sorting the rows.

What a full-ranking evaluation needs from a ``(n_queries, n_database)`` similarity matrix is small: the
position of each labelled image in its query's ranking, and the first ``k`` places for result grids. Both
follow from counts, not from an order of the whole row (``np.sort`` is ~12 ns per element on these CPUs,
NumPy's SIMD sort is not used; the passes below are ~1-2 ns each):

1. every value gets an integer *bucket*, a non-decreasing function of the value within its row
   (``floor`` of an affine map of ``[row min, row max]`` onto ``n_buckets`` integers; IEEE rounding keeps it
   monotone, so a strictly higher bucket always holds a strictly higher value);
2. a histogram of the buckets gives, for any value, how many values of its row lie in higher buckets;
3. only the values sharing a bucket with a value of interest (a labelled image, or the bucket of the k-th
   place) are compared exactly, ties included.

Positions follow the contract of ``index.rank_by_similarity``: a stable order, best first, equal values by
lower index: position = #(higher values) + #(equal values at a lower index). Exact for any finite floats.
Rows are processed in blocks that bound the temporaries; a block whose buckets are too crowded (e.g. mostly
equal values) or whose range overflows its float type falls back to sorting its rows.
"""

from __future__ import annotations

import numpy as np

# Cells per block: bounds the temporaries (keys int32 + one float copy) to ~8 B per cell.
_BLOCK_CELLS = 1 << 22
# Exact comparisons allowed per cell of a block before sorting its rows instead (many equal values).
_MAX_PAIRS_PER_CELL = 4


def _as_float(sim: np.ndarray) -> np.ndarray:
    sim = np.asarray(sim)
    if sim.ndim != 2 or not np.issubdtype(sim.dtype, np.floating):
        raise ValueError(
            f"sim must be a 2-D float array (n_queries, n_database), got {sim.dtype} {sim.shape}"
        )
    if sim.dtype not in (np.float32, np.float64):  # float16 etc.: widening is exact and keeps the order
        sim = sim.astype(np.float32)
    return np.ascontiguousarray(sim)


def _bucket_keys(block: np.ndarray, n_buckets: int) -> tuple[np.ndarray, int] | None:
    """Integer keys, row ``r`` of the block in ``[r * stride, (r + 1) * stride)``, non-decreasing in the value
    within a row; None when a row's range overflows its float type (then the caller sorts instead)."""
    rows = block.shape[0]
    lo = block.min(axis=1, keepdims=True)
    hi = block.max(axis=1, keepdims=True)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):  # min/max propagate NaN
        raise ValueError("sim holds NaN or infinite similarities")
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        span = hi - lo
        # (n_buckets - 1) / span: the top value lands near n_buckets - 1, rounding cannot reach n_buckets
        scale = np.where(span > 0, (n_buckets - 1) / span, 0.0).astype(block.dtype)
    if not (np.isfinite(span).all() and np.isfinite(scale).all()):  # overflowing span, or 1/span (denormals)
        return None
    # v - lo >= 0 (exactly ordered, no cancellation), times the scale, plus the row's integer offset; a guard
    # bucket at each end of a row absorbs the rounding, so rows never overlap
    stride = n_buckets + 2
    x = np.subtract(block, lo)
    x *= scale
    x += np.arange(rows, dtype=block.dtype)[:, None] * stride + 1
    return x.astype(np.intp), stride  # intp: bincount and take would convert int32 keys on every call


def _check_block_size(rows: int, stride: int, dtype: np.dtype) -> None:
    # the row offsets must be exact in the block's float type with a spacing <= 1/4: < 2**22 for float32
    limit = 1 << (21 if dtype == np.float32 else 50)
    if rows * stride > limit:
        raise AssertionError(f"row block too large for exact keys: {rows} x {stride}")


def _by_sort(
    block: np.ndarray, rows: np.ndarray, items: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Both answers from sorted rows: the fallback for crowded buckets (mostly equal values) and huge ranges."""
    head = np.argsort(-block, axis=1, kind="stable")[:, :k].astype(np.int64) if k else None
    return _positions_by_sort(block, rows, items), head


def _positions_by_sort(block: np.ndarray, rows: np.ndarray, items: np.ndarray) -> np.ndarray:
    """The same positions from sorted rows (one binary search per value): the fallback for crowded buckets."""
    srt = np.sort(block, axis=1)
    values = block[rows, items]
    out = np.empty(rows.size, dtype=np.int64)
    for r in np.unique(rows):
        sel = np.flatnonzero(rows == r)
        higher = block.shape[1] - np.searchsorted(srt[r], values[sel], side="right")
        equal_before = [int(np.count_nonzero(block[r, : items[s]] == values[s])) for s in sel]
        out[sel] = higher + np.asarray(equal_before, dtype=np.int64)
    return out


def _scan_block(
    block: np.ndarray, rows: np.ndarray, items: np.ndarray, k: int, n_buckets: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Positions of ``block[rows, items]`` in their rows and the first ``k`` places of every row (k=0: none)."""
    nr, n = block.shape
    bucketed = _bucket_keys(block, n_buckets)
    if bucketed is None:
        return _by_sort(block, rows, items, k)
    keys, stride = bucketed
    _check_block_size(nr, stride, block.dtype)
    flat_keys = keys.ravel()
    counts = np.bincount(flat_keys, minlength=nr * stride).reshape(nr, stride)
    at_least = np.cumsum(counts[:, ::-1], axis=1)[
        :, ::-1
    ]  # at_least[r, b] = #values of row r in buckets >= b
    values = block.ravel()

    positions = np.zeros(0, dtype=np.int64)
    if rows.size:
        flat_items = rows * n + items
        item_keys = flat_keys[flat_items]
        positions = (at_least.ravel()[item_keys] - counts.ravel()[item_keys]).astype(
            np.int64
        )  # higher buckets
        # the values sharing a bucket with a value asked for, compared exactly
        mark = np.zeros(nr * stride, dtype=bool)
        mark[item_keys] = True
        own = np.flatnonzero(np.take(mark, flat_keys))
        own_keys = flat_keys[own]
        order = np.argsort(item_keys, kind="stable")  # the values asked for, grouped by bucket
        per_bucket = np.bincount(item_keys, minlength=nr * stride)
        n_pairs = per_bucket[own_keys]
        first = (np.cumsum(per_bucket) - per_bucket)[own_keys]
        if int(n_pairs.sum()) > _MAX_PAIRS_PER_CELL * block.size:
            positions = _positions_by_sort(block, rows, items)
        else:
            if (n_pairs == 1).all():
                pair_item, pair_cand = order[first], own
            else:  # several values asked for in one bucket: one pair per (candidate, value)
                rep = np.repeat(np.arange(own.size), n_pairs)
                within = np.arange(rep.size) - np.repeat(np.cumsum(n_pairs) - n_pairs, n_pairs)
                pair_item, pair_cand = order[first[rep] + within], own[rep]
            at_item = flat_items[pair_item]
            v_item, v_cand = values[at_item], values[pair_cand]
            beats = (v_cand > v_item) | ((v_cand == v_item) & (pair_cand < at_item))
            positions += np.bincount(pair_item[beats], minlength=rows.size)

    head = None
    if k:
        # per row, the values from the bucket holding the k-th place up: >= k of them, ordered exactly
        kth_bucket = (at_least >= k).sum(axis=1) - 1
        top = np.flatnonzero(keys >= (np.arange(nr) * stride + kth_bucket)[:, None])
        r_top = top // n
        top = top[_row_value_order(r_top, values[top])]
        start = np.searchsorted(r_top, np.arange(nr))  # r_top is sorted (row-major), rows keep their places
        head = (top[start[:, None] + np.arange(k)[None, :]] - (np.arange(nr) * n)[:, None]).astype(np.int64)
    return positions, head


def _row_value_order(rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Stable order by row ascending, then value descending (equal values keep their order: lower index first).

    float32: one int64 key per element (row in the high half, the value's bits made order-preserving in the
    low half) and a stable argsort, ~3x faster than ``np.lexsort`` of three keys."""
    if values.dtype != np.float32 or rows.size == 0:
        return np.lexsort((-values, rows))
    bits = (values + np.float32(0.0)).view(np.int32)  # + 0.0 turns -0.0 into +0.0: they compare equal
    ordered = bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))  # signed-int order == float order
    descending = (~ordered).astype(np.int64) + (1 << 31)  # in [0, 2**32), larger value -> smaller key
    return np.argsort((rows.astype(np.int64) << 32) | descending, kind="stable")


def positions_and_top_k(
    sim: np.ndarray, rows: np.ndarray, items: np.ndarray, k: int = 0, n_buckets: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """0-based positions of ``sim[rows, items]`` in their rows' stable descending order, and the first ``k``
    columns of every row's ranking (``None`` when ``k == 0``), as ``index.rank_by_similarity`` would give them.

    ``sim``: finite floats (NaN/inf raise). ``rows``/``items``: 1-D integer arrays, pairs need not be sorted.
    """
    sim = _as_float(sim)
    nq, n = sim.shape
    rows = np.asarray(rows, dtype=np.int64).ravel()
    items = np.asarray(items, dtype=np.int64).ravel()
    if rows.shape != items.shape:
        raise ValueError(f"rows and items must have one shape, got {rows.shape} and {items.shape}")
    if rows.size and (rows.min() < 0 or rows.max() >= nq or items.min() < 0 or items.max() >= n):
        raise ValueError(f"(row, item) pairs outside the {nq} x {n} similarity matrix")
    k = min(int(k), n)
    if nq == 0 or n == 0:
        return np.zeros(rows.size, dtype=np.int64), (np.zeros((nq, 0), np.int64) if k else None)
    # ~8 values per bucket: the per-bucket tables stay small next to the rows, the exact comparisons few
    n_buckets = int(n_buckets or min(max(n // 8, 16), 1 << 16))
    block_rows = max(1, min(_BLOCK_CELLS // n, (1 << 21) // (n_buckets + 2)))
    starts = list(range(0, nq, block_rows))
    by_row = np.argsort(rows, kind="stable")
    bounds = np.searchsorted(rows[by_row], starts + [nq])

    def run(i: int) -> tuple[np.ndarray, np.ndarray | None]:
        s, e = starts[i], min(starts[i] + block_rows, nq)
        sel = by_row[bounds[i] : bounds[i + 1]]
        return _scan_block(sim[s:e], rows[sel] - s, items[sel], k, n_buckets)

    results = [run(i) for i in range(len(starts))]  # threads over blocks were slower: the passes hold the GIL
    positions = np.empty(rows.size, dtype=np.int64)
    for i, (pos, _) in enumerate(results):
        positions[by_row[bounds[i] : bounds[i + 1]]] = pos
    head = np.concatenate([h for _, h in results]) if k else None
    return positions, head


def top_k(sim: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` columns of every row's stable descending order (ties by lower index)."""
    empty = np.zeros(0, dtype=np.int64)
    return positions_and_top_k(sim, empty, empty, max(int(k), 1))[1][:, : int(k)]
