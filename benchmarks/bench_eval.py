"""Revisited mAP from given similarities: dalg.retrieval (rank_by_similarity + evaluate_revisited) against a
straightforward per-query NumPy implementation of shared/design/protocol.md written here.

Both must give the same mAP / mP@k before anything is timed; then they are timed interleaved.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from measure import interleaved, median

from dalg.retrieval.index import rank_by_similarity
from dalg.retrieval.metrics import evaluate_revisited

SETUP_LISTS = {"E": (("easy",), ("junk", "hard")), "M": (("easy", "hard"), ("junk",)),
               "H": (("hard",), ("junk", "easy"))}


def reference_scores(sim: np.ndarray, gnd: Sequence[Mapping], kappas: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Per query: rank, drop ignored images, trapezoid AP and clipped mP@k (protocol.md), in percent."""
    out: dict[str, float] = {}
    ranks = [np.argsort(-sim[q], kind="stable") for q in range(sim.shape[0])]
    for setup, (ok_keys, junk_keys) in SETUP_LISTS.items():
        aps, pks = [], {k: [] for k in kappas}
        for q, g in enumerate(gnd):
            ok = np.concatenate([np.asarray(g[k], dtype=np.int64) for k in ok_keys])
            junk = np.concatenate([np.asarray(g[k], dtype=np.int64) for k in junk_keys])
            if ok.size == 0:
                continue  # skipped query
            order = ranks[q]
            pos = np.flatnonzero(np.isin(order, ok))
            junk_pos = np.flatnonzero(np.isin(order, junk))  # as the official code: strictly-before junk counts
            ap = 0.0
            clean = []
            for j, p in enumerate(pos):
                r = int(p - np.sum(junk_pos < p))  # junk-free 0-based position
                clean.append(r)
                p0 = 1.0 if r == 0 else j / r
                p1 = (j + 1) / (r + 1)
                ap += (p0 + p1) / 2 / ok.size
            aps.append(ap)
            pos1 = np.asarray(clean) + 1
            for k in kappas:
                kq = min(int(pos1.max()), k)
                pks[k].append(float(np.sum(pos1 <= kq)) / kq)
        out[f"mAP_{setup}"] = float(np.mean(aps) * 100) if aps else float("nan")
        for k in kappas:
            out[f"mP@{k}_{setup}"] = float(np.mean(pks[k]) * 100) if aps else float("nan")
    return out


def fast_scores(sim: np.ndarray, gnd: Sequence[Mapping]) -> dict[str, float]:
    return evaluate_revisited(rank_by_similarity(sim), gnd).as_dict()


def labelled_positions(sim: np.ndarray, gnd: Sequence[Mapping]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query, 0-based position in the full ranking, easy/hard/junk bits) of every labelled database image,
    without ranking the database: position = #(higher similarity) + #(equal similarity, lower index).

    One value sort per row (much cheaper than a stable argsort) and a binary search per labelled image; ties
    with the labelled image's score are counted directly (rare with float scores).
    """
    nq, n = sim.shape
    names = ("easy", "hard", "junk")
    lengths = np.array([[len(g[k] or ()) for k in names] for g in gnd], dtype=np.int64).reshape(nq, 3)
    it_all = np.fromiter(itertools.chain.from_iterable(g[k] or () for g in gnd for k in names), dtype=np.int64,
                         count=int(lengths.sum()))
    q_all = np.repeat(np.arange(nq, dtype=np.int64), lengths.sum(axis=1))
    b_all = np.repeat(np.tile(np.array([1, 2, 4], dtype=np.uint8), nq), lengths.ravel())
    keys = q_all * n + it_all  # merge an image listed twice for one query (bits OR-ed, as the lookup table)
    ukeys, inv = np.unique(keys, return_inverse=True)
    ubits = np.zeros(ukeys.size, dtype=np.uint8)
    np.bitwise_or.at(ubits, inv, b_all)
    uq, uit = ukeys // n, ukeys % n
    srt = np.sort(sim, axis=1)
    vals = sim[uq, uit]
    pos = np.empty(ukeys.size, dtype=np.int64)
    starts = np.searchsorted(uq, np.arange(nq + 1))
    for q in range(nq):
        a, b = starts[q], starts[q + 1]
        if a == b:
            continue
        v = vals[a:b]
        hi = np.searchsorted(srt[q], v, side="right")
        lo = np.searchsorted(srt[q], v, side="left")
        pos[a:b] = n - hi  # strictly higher scores
        for t in np.flatnonzero(hi - lo > 1):  # ties: equal scores rank by lower index first
            pos[a + t] += int(np.count_nonzero(sim[q, : uit[a + t]] == v[t]))
    return uq, pos, ubits


def prototype_scores(sim: np.ndarray, gnd: Sequence[Mapping], kappas: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Revisited mAP / mP@k from the labelled positions only (a proposal for dalg.retrieval.metrics)."""
    nq = sim.shape[0]
    uq, pos, ubits = labelled_positions(sim, gnd)
    order = np.lexsort((pos, uq))
    uq, pos, ubits = uq[order], pos[order], ubits[order]
    lengths = np.array([[len(g[k] or []) for k in ("easy", "hard", "junk")] for g in gnd])
    n_per = {"E": lengths[:, 0], "M": lengths[:, 0] + lengths[:, 1], "H": lengths[:, 1]}
    bits = {"E": (1, 6), "M": (3, 4), "H": (2, 5)}
    row_start = np.searchsorted(uq, np.arange(nq))
    out: dict[str, float] = {}
    for setup in ("E", "M", "H"):
        pos_bits, junk_bits = bits[setup]
        n = n_per[setup]
        valid = n > 0
        junk_excl = np.r_[0, np.cumsum((ubits & junk_bits) != 0)]
        p = np.flatnonzero((ubits & pos_bits) != 0)
        prow = uq[p]
        r = (pos[p] - (junk_excl[p] - junk_excl[row_start][prow])).astype(np.float64)
        counts = np.bincount(prow, minlength=nq)
        first = np.cumsum(counts) - counts
        j = (np.arange(p.size) - first[prow]).astype(np.float64)
        p0 = np.where(r == 0, 1.0, j / np.maximum(r, 1.0))
        ap = np.bincount(prow, weights=((p0 + (j + 1) / (r + 1)) / 2), minlength=nq)[valid] / n[valid]
        out[f"mAP_{setup}"] = float(ap.mean() * 100)
        max_pos = np.zeros(nq)
        has = counts > 0
        max_pos[has] = r[first[has] + counts[has] - 1] + 1
        for k in kappas:
            kq = np.minimum(max_pos, k)
            hits = np.bincount(prow, weights=(r + 1) <= kq[prow], minlength=nq)
            out[f"mP@{k}_{setup}"] = float(np.divide(hits, kq, out=np.zeros(nq), where=kq > 0)[valid].mean() * 100)
    return out


def make_problem(n_queries: int, n_database: int, seed: int = 0) -> tuple[np.ndarray, list[dict]]:
    """Similarities with a Revisited-like ground truth: ~5-40 labelled images per query, positives ranked high."""
    rng = np.random.default_rng(seed)
    sim = rng.standard_normal((n_queries, n_database)).astype(np.float32) * 0.1
    gnd = []
    for q in range(n_queries):
        labelled = rng.choice(n_database, size=int(rng.integers(5, 40)), replace=False)
        ne = nh = len(labelled) // 3
        easy, hard, junk = labelled[:ne], labelled[ne:ne + nh], labelled[ne + nh:]
        sim[q, easy] += 0.35
        sim[q, hard] += 0.15
        sim[q, junk] += 0.25
        if q % 10 == 0:
            easy = easy[:0]  # a few queries without easy positives: skipped in the Easy setup
        gnd.append({"easy": easy.tolist(), "hard": hard.tolist(), "junk": junk.tolist()})
    return sim, gnd


def run(n_queries: int = 70, n_database: int = 5000, rounds: int = 7, log=print) -> dict[str, Any]:
    sim, gnd = make_problem(n_queries, n_database)
    ref, fast, proto = reference_scores(sim, gnd), fast_scores(sim, gnd), prototype_scores(sim, gnd)
    worst = 0.0
    for name, got in (("evaluate_revisited", fast), ("prototype_scores", proto)):
        diff = max(abs(ref[k] - got[k]) for k in ref) if set(ref) == set(got) else float("inf")
        if diff > 1e-9:
            raise AssertionError(f"{name} disagrees with the per-query reference (max |diff| {diff}): "
                                 f"{ref} vs {got}")
        worst = max(worst, diff)
    ranks = rank_by_similarity(sim)
    times = interleaved({
        "reference": lambda: reference_scores(sim, gnd),
        "dalg": lambda: fast_scores(sim, gnd),
        "dalg_rank_only": lambda: rank_by_similarity(sim),
        "dalg_score_only": lambda: evaluate_revisited(ranks, gnd),
        "prototype": lambda: prototype_scores(sim, gnd),
    }, rounds)
    ms = {k: median(v) * 1e3 for k, v in times.items()}
    log(f"  reference {ms['reference']:.1f} ms, dalg {ms['dalg']:.1f} ms (rank {ms['dalg_rank_only']:.1f} + "
        f"score {ms['dalg_score_only']:.1f}) -> {ms['reference'] / ms['dalg']:.1f}x; prototype "
        f"{ms['prototype']:.1f} ms -> {ms['reference'] / ms['prototype']:.1f}x")
    return {"n_queries": n_queries, "n_database": n_database, "rounds": rounds, "same_scores": True,
            "max_abs_diff": worst, "mAP": {k: v for k, v in fast.items() if k.startswith("mAP")},
            "median_ms": ms, "round_ms": {k: [round(x * 1e3, 2) for x in v] for k, v in times.items()},
            "speedup": ms["reference"] / ms["dalg"],
            "speedup_given_ranks": ms["reference"] / ms["dalg_score_only"],
            "speedup_prototype": ms["reference"] / ms["prototype"]}
