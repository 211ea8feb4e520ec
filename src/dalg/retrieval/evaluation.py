"""From descriptors to revisited scores: search (+ distractors) -> optional re-ranking -> mAP / mP@k.

One function shared by ``src/eval.py`` and the validation callback, so that both rank and score the same
way and both report the protocol options they used. Routes:

- full ranking, no re-ranking (the protocol default): exact similarities in database chunks, scored straight from
  them (``evaluate_revisited_and_top_k``: positions and the ranking's head counted from per-row value
  buckets, no row sorted);
- top-k (``ranking.top_k``, e.g. +1M): FAISS ``IndexFlatIP`` over database chunks, then the ranked metric;
- re-ranking: the ranking (full or top-k) with its shortlist re-ordered, then the ranked metric.

What one evaluation set's evaluation gives (:class:`SetResult`), its one-line protocol summary and the table are
defined here too, so that training, ``src/eval.py`` and anything that reads their results agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from dalg.retrieval.index import search, similarity_matrix
from dalg.retrieval.metrics import (
    SETUPS,
    RevisitedScores,
    evaluate_revisited,
    evaluate_revisited_and_top_k,
)
from dalg.retrieval.rerank import rerank_topk


@dataclass
class RankingOptions:
    """How the database is ranked. Defaults reproduce the official protocol (full ranking, no re-ranking)."""

    top_k: int | None = None  # None: full ranking; else truncated top-k (positives beyond count as misses)
    chunk_size: int = 65536
    use_gpu: bool | None = None
    rerank: bool = False  # alpha-QE + shortlist DBA (rerank.py); off in published protocol numbers
    rerank_k: int = 100
    qe_n: int = 2
    dba_n: int = 2
    alpha: float = 3.0

    @classmethod
    def from_mapping(cls, cfg: Mapping | None) -> RankingOptions:
        cfg = dict(cfg or {})
        unknown = set(cfg) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown ranking options {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**cfg)


def describe(options: RankingOptions, n_database: int, n_distractors: int) -> dict[str, object]:
    """The protocol options as they go into tables and JSON."""
    out: dict[str, object] = {
        "database": n_database,
        "distractors": n_distractors,
        "ranking": "full"
        if options.top_k is None
        else f"top-{options.top_k} (truncated; missing positives count)",
        "rerank": (
            f"alpha-QE n={options.qe_n} + shortlist DBA n={options.dba_n}, alpha={options.alpha}, top-{options.rerank_k}"
            if options.rerank
            else "off"
        ),
    }
    out["options"] = asdict(options)
    return out


def rank_and_score(
    queries: np.ndarray,
    database: np.ndarray,
    gnd: Sequence[Mapping],
    distractors: np.ndarray | None = None,
    options: RankingOptions | None = None,
    kappas: Sequence[int] = (1, 5, 10),
    keep_ranks: int = 100,
) -> tuple[RevisitedScores, np.ndarray, dict[str, object]]:
    """Rank ``database`` (then ``distractors``, indexed after it) for every query and score the ranking.

    Returns ``(scores, ranks, protocol)``: ``ranks`` holds at least the first ``keep_ranks`` places of every
    query's ranking (for result grids; the full-ranking route does not materialise the rest), ``protocol`` says
    how it was ranked (see :func:`describe`).
    """
    options = options or RankingOptions()
    parts = [database] if distractors is None else [database, distractors]
    n_total = sum(int(p.shape[0]) for p in parts)
    n_dis = 0 if distractors is None else int(distractors.shape[0])
    protocol = describe(options, int(database.shape[0]), n_dis)
    if options.top_k is None and not options.rerank:
        sim = similarity_matrix(queries, parts, chunk_size=options.chunk_size)
        scores, head = evaluate_revisited_and_top_k(sim, gnd, kappas, k=keep_ranks)
        return scores, head, protocol
    k = None if options.top_k is None else min(int(options.top_k), n_total)
    _, ranks = search(queries, parts, k, chunk_size=options.chunk_size, use_gpu=options.use_gpu)
    if options.rerank:
        ranks = rerank_topk(
            queries,
            parts,
            ranks,
            k=options.rerank_k,
            qe_n=options.qe_n,
            dba_n=options.dba_n,
            alpha=options.alpha,
        )
    scores = evaluate_revisited(ranks, gnd, kappas, n_database=n_total)
    return scores, ranks, protocol


@dataclass
class SetResult:
    """The evaluation of one set: its scores, the head of its ranking and how it was ranked.

    ``ranks`` holds the first places of every query's ranking (database indices, best first; distractors after
    the database); it is None on processes other than global rank 0, which alone searches.
    """

    name: str  # the set's name in metric keys (val/<name>/mAP_M)
    scores: RevisitedScores
    ranks: np.ndarray | None
    protocol: dict[str, Any]  # describe() + the set's own options (crop_queries, test_size, ...)
    query_paths: list[str]
    query_boxes: list | None  # per query [x1, y1, x2, y2] or None; None when queries are not cropped
    database_paths: list[str]
    gnd: list[dict]

    @property
    def n_queries(self) -> int:
        return len(self.query_paths)

    def to_json(self) -> dict[str, Any]:
        """What the results JSON holds per set (src/eval.py's ``sets.<name>``)."""
        return {
            "scores": self.scores.as_dict(),
            "truncated": self.scores.truncated,
            "protocol": self.protocol,
            "n_queries": self.n_queries,
            "per_query_ap": {
                s: [None if math.isnan(float(v)) else float(v) for v in ap]
                for s, ap in self.scores.aps.items()
            },
        }


def protocol_summary(protocol: Mapping[str, Any]) -> str:
    """One line for tables: crop, test size, [scales, inference,] ranking, database (+distractors), re-ranking."""
    parts = [f"crop={'on' if protocol.get('crop_queries') else 'OFF'}", f"size={protocol.get('test_size')}"]
    if "scales" in protocol:
        parts.append(f"scales={protocol['scales']}")
    if "inference" in protocol:
        parts.append(str(protocol["inference"]))
    distractors = f"+{protocol['distractors']:,} distractors" if protocol.get("distractors") else ""
    parts.append(f"{protocol['ranking']} of {protocol['database']:,}{distractors}")
    parts.append(f"rerank {protocol['rerank']}")
    whitening = protocol.get("whitening")
    if isinstance(whitening, Mapping):  # Whitening.describe(): src/eval.py whitening=
        parts.append(f"whitening {whitening.get('method')} {whitening['dim'][0]}->{whitening['dim'][1]}")
    return ", ".join(parts)


def print_results(results: Mapping[str, SetResult], title: str, console: Console | None = None) -> None:
    """One row per (set, setup): mAP and mP@k in percent, as in the Revisited papers' tables, and the protocol."""
    console = console or Console()
    kappas = sorted({k for r in results.values() for k in r.scores.mpk[SETUPS[0]]})
    table = Table(title=title)
    for col in ("set", "setup", "mAP", *(f"mP@{k}" for k in kappas), "options"):
        table.add_column(col, justify="left" if col in ("set", "options") else "right")
    for name, result in results.items():
        for setup in SETUPS:
            first = setup == SETUPS[0]
            mpk = result.scores.mpk[setup]
            table.add_row(
                name if first else "",
                setup,
                f"{result.scores.map[setup]:.2f}",
                *(f"{mpk[k]:.2f}" if k in mpk else "" for k in kappas),
                protocol_summary(result.protocol) if first else "",
            )
    console.print(table)
    if any(r.scores.truncated for r in results.values()):
        console.print(
            "[yellow]truncated top-k ranking: positives outside the top-k count as misses (protocol.md)"
        )
