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

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from dalg.retrieval.row_buckets import positions_and_top_k

# The protocol's setups (protocol.md), the one table of them: (ground-truth lists that are positives, lists ignored)
SETUP_LISTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "E": (("easy",), ("hard", "junk")),
    "M": (("easy", "hard"), ("junk",)),
    "H": (("hard",), ("easy", "junk")),
}
SETUPS: tuple[str, ...] = tuple(SETUP_LISTS)
_LISTS = ("easy", "hard", "junk")  # the order of the gnd lists in flat arrays and the lengths' columns
_EASY, _HARD, _JUNK = np.uint8(1), np.uint8(2), np.uint8(4)
_BITS = dict(zip(_LISTS, (_EASY, _HARD, _JUNK)))
# setup -> (bits that make an item a positive, bits that make it ignored)
_SETUP_BITS: dict[str, tuple[int, int]] = {
    s: tuple(int(np.bitwise_or.reduce([_BITS[k] for k in lists])) for lists in (pos, ignored))
    for s, (pos, ignored) in SETUP_LISTS.items()
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


def _gnd_lists(gnd: Sequence[Mapping], n_database: int) -> tuple[np.ndarray, np.ndarray]:
    """All (easy, hard, junk) indices as one flat int64 array + the ``(n_queries, 3)`` list lengths."""
    keys = _LISTS
    lengths = np.zeros((len(gnd), 3), dtype=np.int64)
    for i, g in enumerate(gnd):
        if not isinstance(g, Mapping):
            raise TypeError(f"gnd[{i}] must be a mapping with keys easy/hard/junk, got {type(g).__name__}")
        for t, key in enumerate(keys):
            if key not in g:
                raise KeyError(f"gnd[{i}] has no key {key!r} (keys: {sorted(g)})")
            lengths[i, t] = len(g[key]) if g[key] is not None else 0
    flat = np.fromiter(
        itertools.chain.from_iterable(g[key] for g in gnd for key in keys if g[key] is not None),
        dtype=np.int64,
        count=int(lengths.sum()),
    )
    if flat.size and (flat.min() < 0 or flat.max() >= n_database):
        bad = int(flat.min()) if flat.min() < 0 else int(flat.max())
        where = int(np.flatnonzero(flat == bad)[0])
        i, t = divmod(int(np.searchsorted(np.cumsum(lengths.ravel()), where, side="right")), 3)
        raise ValueError(
            f"gnd[{i}][{keys[t]!r}] has index {bad} outside the database [0, {n_database}) "
            "-- 1-based (MATLAB) ground truth?"
        )
    return flat, lengths


def _labels_of_ranks(ranks: np.ndarray, flat: np.ndarray, lengths: np.ndarray, n_database: int) -> np.ndarray:
    """uint8 bit flags (easy=1, hard=2, junk=4) of every ranked item, shape of ``ranks``."""
    nq = ranks.shape[0]
    if flat.size == 0:
        return np.zeros(ranks.shape, dtype=np.uint8)
    rows = np.repeat(np.repeat(np.arange(nq, dtype=np.int64), 3), lengths.ravel())
    bits = np.repeat(np.tile(np.array([_EASY, _HARD, _JUNK], dtype=np.uint8), nq), lengths.ravel())
    keys = rows * n_database + flat

    if nq * n_database <= _DENSE_TABLE_MAX_CELLS:
        table = np.zeros(nq * n_database, dtype=np.uint8)
        for bit in (_EASY, _HARD, _JUNK):  # one bit at a time: repeated keys are harmless
            table[keys[bits == bit]] |= bit
        offsets = np.arange(0, nq * n_database, n_database, dtype=np.int64)[:, None]
        return np.take(table, ranks + offsets)

    # Large database (e.g. +1M): look the (query, item) keys up in a sorted array instead.
    order = np.argsort(keys, kind="stable")
    keys, bits = keys[order], bits[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ukeys = keys[starts]
    ubits = np.bitwise_or.reduceat(bits, starts)
    query_keys = np.arange(nq, dtype=np.int64)[:, None] * n_database + ranks
    pos = np.minimum(np.searchsorted(ukeys, query_keys), ukeys.size - 1)
    return np.where(ukeys[pos] == query_keys, ubits[pos], np.uint8(0)).astype(np.uint8)


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
    ranks = np.ascontiguousarray(ranks, dtype=np.int64)
    # one pass: viewed as unsigned, a negative index is huge, so max() < n catches both ends
    if ranks.size and int(ranks.view(np.uint64).max()) >= n_database:
        raise ValueError(
            f"ranks hold indices outside [0, {n_database}): min {ranks.min()}, max {ranks.max()}"
        )

    flat, lengths = _gnd_lists(gnd, n_database)
    labels = _labels_of_ranks(ranks, flat, lengths, n_database)
    # Only labelled entries matter; flatnonzero returns them sorted by (query, rank position).
    where = np.flatnonzero(labels)
    rows = where // k
    cols = where - rows * k
    lab = labels.ravel()[where]
    return _score_labelled(rows, cols, lab, lengths, nq, kappas, truncated=k < n_database)


def _score_labelled(
    rows: np.ndarray,
    cols: np.ndarray,
    lab: np.ndarray,
    lengths: np.ndarray,
    nq: int,
    kappas: tuple[int, ...],
    truncated: bool,
) -> RevisitedScores:
    """Scores from the labelled items only: query ``rows``, 0-based ranked positions ``cols`` and easy/hard/
    junk bits ``lab``, sorted by (row, position); ``lengths`` = (n_queries, 3) sizes of the gnd lists."""
    first_of_row = np.searchsorted(rows, np.arange(nq))  # index of each query's first labelled item
    n_per_setup = {  # positives per query: the lengths of the setup's positive lists
        s: sum(lengths[:, _LISTS.index(k)] for k in pos) for s, (pos, _) in SETUP_LISTS.items()
    }

    out_map: dict[str, float] = {}
    out_mpk: dict[str, dict[int, float]] = {}
    out_aps: dict[str, np.ndarray] = {}
    for setup in SETUPS:
        pos_bits, junk_bits = _SETUP_BITS[setup]
        n = n_per_setup[setup]
        valid = n > 0
        is_pos = (lab & pos_bits) != 0
        # ignored items ranked before each positive of the same query: a running count over all labelled
        # items, minus the count reached when the query starts
        junk_incl = np.cumsum((lab & junk_bits) != 0, dtype=np.int64)
        junk_excl = np.r_[0, junk_incl]  # junk_excl[t] = ignored items among labelled items 0..t-1
        junk_at_row_start = junk_excl[first_of_row]
        p_idx = np.flatnonzero(is_pos)
        prow = rows[p_idx]
        r = (cols[p_idx] - (junk_excl[p_idx] - junk_at_row_start[prow])).astype(np.float64)
        counts = np.bincount(prow, minlength=nq)
        row_first_pos = np.cumsum(counts) - counts
        j = (np.arange(p_idx.size) - row_first_pos[prow]).astype(np.float64)  # 0-based rank among positives
        p0 = np.where(r == 0, 1.0, j / np.maximum(r, 1.0))
        p1 = (j + 1.0) / (r + 1.0)
        ap_sum = np.bincount(prow, weights=(p0 + p1) / 2.0, minlength=nq)
        aps = np.full(nq, np.nan)
        aps[valid] = ap_sum[valid] / n[valid]

        # mP@k: positives are sorted by position within a query, so the last one holds the largest position
        pos1 = r + 1.0
        max_pos = np.zeros(nq)
        has = counts > 0
        max_pos[has] = pos1[row_first_pos[has] + counts[has] - 1]
        mpk: dict[int, float] = {}
        for kap in kappas:
            kq = np.minimum(max_pos, kap)
            hits = np.bincount(prow, weights=pos1 <= kq[prow], minlength=nq)
            prec = np.divide(hits, kq, out=np.zeros(nq), where=kq > 0)
            mpk[kap] = float(prec[valid].mean() * 100.0) if valid.any() else float("nan")
        out_aps[setup] = aps
        out_map[setup] = float(np.nanmean(aps) * 100.0) if valid.any() else float("nan")
        out_mpk[setup] = mpk
    return RevisitedScores(map=out_map, mpk=out_mpk, aps=out_aps, truncated=truncated)


def evaluate_revisited_from_similarity(
    sim: np.ndarray, gnd: Sequence[Mapping], kappas: Sequence[int] = (1, 5, 10)
) -> RevisitedScores:
    """Same scores as ``evaluate_revisited(rank_by_similarity(sim), gnd)``, without ranking the database.

    Only the positions of the labelled images are needed: position = #(higher similarity) + #(equal
    similarity, lower index), i.e. the stable order with ties broken by the lower index. They are counted from
    per-row value buckets (``row_buckets``), no row is sorted. ``sim``: ``(n_queries, n_database)`` finite
    similarities.
    """
    return evaluate_revisited_and_top_k(sim, gnd, kappas, k=0)[0]


def evaluate_revisited_and_top_k(
    sim: np.ndarray, gnd: Sequence[Mapping], kappas: Sequence[int] = (1, 5, 10), k: int = 100
) -> tuple[RevisitedScores, np.ndarray | None]:
    """:func:`evaluate_revisited_from_similarity` and the first ``k`` places of every ranking (``None`` for
    ``k=0``; ``index.topk_from_similarity``), from one pass over ``sim``."""
    sim = np.asarray(sim)
    if sim.ndim != 2 or not np.issubdtype(sim.dtype, np.floating):
        raise ValueError(
            f"sim must be a 2-D float array (n_queries, n_database), got {sim.dtype} {sim.shape}"
        )
    nq, n = sim.shape
    if len(gnd) != nq:
        raise ValueError(f"sim has {nq} queries (rows) but gnd has {len(gnd)} entries")
    kappas = tuple(int(x) for x in kappas)
    if any(x < 1 for x in kappas):
        raise ValueError(f"kappas must be >= 1, got {kappas}")
    flat, lengths = _gnd_lists(gnd, n)
    rows = np.repeat(np.repeat(np.arange(nq, dtype=np.int64), 3), lengths.ravel())
    bits = np.repeat(np.tile(np.array([_EASY, _HARD, _JUNK], dtype=np.uint8), nq), lengths.ravel())
    # one entry per (query, image): an image in two lists of a query gets both bits, as in the lookup table
    keys = rows * n + flat
    order = np.argsort(keys, kind="stable")
    keys, bits = keys[order], bits[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if keys.size else np.zeros(0, np.int64)
    ukeys = keys[starts]
    ubits = np.bitwise_or.reduceat(bits, starts) if keys.size else bits
    uq, item = ukeys // n, ukeys % n
    pos, head = positions_and_top_k(sim, uq, item, k)
    o = np.lexsort((pos, uq))
    scores = _score_labelled(uq[o], pos[o], ubits[o], lengths, nq, kappas, truncated=False)
    return scores, head


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
