"""Revisited Oxford/Paris evaluation (Radenović et al., CVPR 2018): mAP and mP@k for Easy/Medium/Hard.

The numbers agree with the official protocol (shared/design/protocol.md) exactly:

* setups: Easy = easy positives, hard+junk ignored; Medium = easy+hard positives, junk ignored;
  Hard = hard positives, easy+junk ignored;
* junk is removed from the ranking (a positive's position drops by the number of ignored images ranked
  above it), then AP uses the trapezoid rule ``p0 = 1 if r == 0 else j / r``, ``p1 = (j + 1) / (r + 1)``,
  ``AP = sum((p0 + p1) / 2) / n`` with ``n = len(positives)``;
* a query without positives in a setup is skipped (its AP is NaN and it is left out of the mean);
* truncated rankings (top-k only): positives outside the top-k still count in ``n`` and add 0;
* mP@k: ``kq = min(max(pos), k)`` over 1-based junk-free positions, ``P@k = |{pos <= kq}| / kq``
  (a query with positives but none inside a truncated ranking gets P@k = 0).

Implementation: one ``uint8`` label per (query, ranked item) gathered from a lookup table (bit flags for
easy/hard/junk, so overlapping lists behave exactly as the official code), then everything is computed
on the few labelled entries only -- vectorised over queries and database, no Python loop over either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

SETUPS: tuple[str, ...] = ("E", "M", "H")
_EASY, _HARD, _JUNK = np.uint8(1), np.uint8(2), np.uint8(4)
# setup -> (bits that make an item a positive, bits that make it ignored)
_SETUP_BITS: dict[str, tuple[int, int]] = {
    "E": (int(_EASY), int(_HARD | _JUNK)),
    "M": (int(_EASY | _HARD), int(_JUNK)),
    "H": (int(_HARD), int(_EASY | _JUNK)),
}
# Above this many (query, database) cells the dense lookup table is replaced by a sorted-key lookup.
_DENSE_TABLE_MAX_CELLS = 1 << 27


@dataclass
class RevisitedScores:
    """Scores of one evaluation; ``map``/``mpk`` in percent, ``aps`` per query in [0, 1] (NaN = skipped)."""

    map: dict[str, float]
    mpk: dict[str, dict[int, float]]
    aps: dict[str, np.ndarray]
    truncated: bool

    def as_dict(self) -> dict[str, float]:
        out = {f"mAP_{s}": self.map[s] for s in SETUPS}
        for s in SETUPS:
            for k, v in self.mpk[s].items():
                out[f"mP@{k}_{s}"] = v
        return out


def _gnd_lists(gnd: Sequence[Mapping], n_database: int) -> tuple[list[np.ndarray], ...]:
    easy, hard, junk = [], [], []
    for i, g in enumerate(gnd):
        if not isinstance(g, Mapping):
            raise TypeError(f"gnd[{i}] must be a mapping with keys easy/hard/junk, got {type(g).__name__}")
        lists = []
        for key in ("easy", "hard", "junk"):
            if key not in g:
                raise KeyError(f"gnd[{i}] has no key {key!r} (keys: {sorted(g)})")
            arr = np.asarray(g[key] if g[key] is not None else [], dtype=np.int64).reshape(-1)
            if arr.size and (arr.min() < 0 or arr.max() >= n_database):
                raise ValueError(
                    f"gnd[{i}][{key!r}] has index {int(arr.min() if arr.min() < 0 else arr.max())} "
                    f"outside the database [0, {n_database}) -- 1-based (MATLAB) ground truth?"
                )
            lists.append(arr)
        easy.append(lists[0])
        hard.append(lists[1])
        junk.append(lists[2])
    return easy, hard, junk


def _labels_of_ranks(ranks: np.ndarray, lists: tuple[list[np.ndarray], ...], n_database: int) -> np.ndarray:
    """uint8 bit flags (easy=1, hard=2, junk=4) of every ranked item, shape of ``ranks``."""
    nq = ranks.shape[0]
    rows_parts, cols_parts, bits_parts = [], [], []
    for bit, per_query in zip((_EASY, _HARD, _JUNK), lists):
        lengths = np.fromiter((a.size for a in per_query), dtype=np.int64, count=nq)
        if lengths.sum() == 0:
            continue
        rows_parts.append(np.repeat(np.arange(nq, dtype=np.int64), lengths))
        cols_parts.append(np.concatenate(per_query))
        bits_parts.append(np.full(int(lengths.sum()), bit, dtype=np.uint8))
    if not rows_parts:
        return np.zeros(ranks.shape, dtype=np.uint8)
    rows = np.concatenate(rows_parts)
    cols = np.concatenate(cols_parts)
    bits = np.concatenate(bits_parts)

    if nq * n_database <= _DENSE_TABLE_MAX_CELLS:
        table = np.zeros((nq, n_database), dtype=np.uint8)
        for bit in (_EASY, _HARD, _JUNK):  # one bit at a time: repeated (row, col) pairs are harmless
            m = bits == bit
            table[rows[m], cols[m]] |= bit
        return np.take_along_axis(table, ranks, axis=1)

    # Large database (e.g. +1M): look the (query, item) keys up in a sorted array instead.
    keys = rows * n_database + cols
    order = np.argsort(keys, kind="stable")
    keys, bits = keys[order], bits[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ukeys = keys[starts]
    ubits = np.bitwise_or.reduceat(bits, starts)
    query_keys = np.arange(nq, dtype=np.int64)[:, None] * n_database + ranks
    pos = np.searchsorted(ukeys, query_keys)
    pos_clipped = np.minimum(pos, ukeys.size - 1)
    hit = ukeys[pos_clipped] == query_keys
    return np.where(hit, ubits[pos_clipped], np.uint8(0)).astype(np.uint8)


def _group_exclusive_cumsum(flags: np.ndarray, row_start_of_item: np.ndarray) -> np.ndarray:
    """For items sorted by row: number of earlier items of the same row whose flag is set."""
    c = np.cumsum(flags, dtype=np.int64)
    excl = c - flags
    return excl - excl[row_start_of_item]


def evaluate_revisited(
    ranks: np.ndarray,
    gnd: Sequence[Mapping],
    kappas: Sequence[int] = (1, 5, 10),
    n_database: int | None = None,
) -> RevisitedScores:
    """Revisited mAP (E/M/H) and mP@k of a ranking.

    Args:
        ranks: ``(n_queries, k)`` integer database indices, best first; each row must list distinct
            indices. ``k == n_database`` for a full ranking.
        gnd: one mapping per query with ``easy``, ``hard`` and ``junk`` (0-based indices into the
            database); other keys (``bbx``) are ignored.
        kappas: the k of mP@k.
        n_database: database size; defaults to ``ranks.shape[1]`` (a full ranking). When larger than
            ``k`` the ranking is truncated and ``truncated`` is set in the result.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be (n_queries, k), got shape {ranks.shape}")
    if not np.issubdtype(ranks.dtype, np.integer):
        raise TypeError(f"ranks must hold integer database indices, got dtype {ranks.dtype}")
    nq, k = ranks.shape
    if len(gnd) != nq:
        raise ValueError(f"ranks has {nq} queries (rows) but gnd has {len(gnd)} entries")
    if n_database is None:
        n_database = k
    if k > n_database:
        raise ValueError(f"ranks has {k} columns but the database has only n_database={n_database} images")
    kappas = tuple(int(x) for x in kappas)
    if any(x < 1 for x in kappas):
        raise ValueError(f"kappas must be >= 1, got {kappas}")
    ranks = ranks.astype(np.int64, copy=False)
    if ranks.size and (ranks.min() < 0 or ranks.max() >= n_database):
        raise ValueError(
            f"ranks hold indices outside [0, {n_database}): min {ranks.min()}, max {ranks.max()}"
        )

    lists = _gnd_lists(gnd, n_database)
    labels = _labels_of_ranks(ranks, lists, n_database)
    # Only labelled entries matter; np.nonzero returns them sorted by (query, rank position).
    rows, cols = np.nonzero(labels)
    lab = labels[rows, cols]
    first_of_row = np.searchsorted(rows, np.arange(nq))  # index of each query's first labelled item
    row_start_of_item = first_of_row[rows]

    n_per_setup = {
        "E": np.array([a.size for a in lists[0]], dtype=np.int64),
        "H": np.array([a.size for a in lists[1]], dtype=np.int64),
    }
    n_per_setup["M"] = n_per_setup["E"] + n_per_setup["H"]

    out_map: dict[str, float] = {}
    out_mpk: dict[str, dict[int, float]] = {}
    out_aps: dict[str, np.ndarray] = {}
    for setup in SETUPS:
        pos_bits, junk_bits = _SETUP_BITS[setup]
        is_pos = (lab & pos_bits) != 0
        is_junk = ((lab & junk_bits) != 0).astype(np.int64)
        junk_before = _group_exclusive_cumsum(is_junk, row_start_of_item)
        j_of_item = _group_exclusive_cumsum(is_pos.astype(np.int64), row_start_of_item)
        prow = rows[is_pos]
        r = (cols[is_pos] - junk_before[is_pos]).astype(np.float64)  # junk-free 0-based position
        j = j_of_item[is_pos].astype(np.float64)
        p0 = np.where(r == 0, 1.0, j / np.maximum(r, 1.0))
        p1 = (j + 1.0) / (r + 1.0)
        n = n_per_setup[setup]
        valid = n > 0
        ap_sum = np.bincount(prow, weights=(p0 + p1) / 2.0, minlength=nq)
        aps = np.full(nq, np.nan)
        aps[valid] = ap_sum[valid] / n[valid]

        # mP@k: last (largest) 1-based junk-free position of a positive per query
        pos1 = r + 1.0
        max_pos = np.zeros(nq)
        np.maximum.at(max_pos, prow, pos1)
        mpk: dict[int, float] = {}
        for kap in kappas:
            kq = np.minimum(max_pos, kap)
            hits = np.bincount(prow, weights=(pos1 <= kq[prow]).astype(np.float64), minlength=nq)
            prec = np.divide(hits, kq, out=np.zeros(nq), where=kq > 0)
            mpk[kap] = float(prec[valid].mean() * 100.0) if valid.any() else float("nan")
        out_aps[setup] = aps
        out_map[setup] = float(np.nanmean(aps) * 100.0) if valid.any() else float("nan")
        out_mpk[setup] = mpk
    return RevisitedScores(map=out_map, mpk=out_mpk, aps=out_aps, truncated=k < n_database)


def format_table(scores: RevisitedScores, title: str = "") -> str:
    """The standard table: one row per setup, mAP then mP@k, in percent with two decimals."""
    kappas = sorted(next(iter(scores.mpk.values())).keys())
    head = ["setup", "mAP"] + [f"mP@{k}" for k in kappas]
    lines = [title] if title else []
    lines.append(" ".join(f"{h:>8}" for h in head))
    names = {"E": "Easy", "M": "Medium", "H": "Hard"}
    for s in SETUPS:
        vals = [scores.map[s]] + [scores.mpk[s][k] for k in kappas]
        lines.append(f"{names[s]:>8} " + " ".join(f"{v:8.2f}" for v in vals))
    if scores.truncated:
        lines.append("(truncated top-k ranking: positives outside the top-k count as misses)")
    return "\n".join(lines)
