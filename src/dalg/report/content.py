"""What the results browser shows, as plain data: one :class:`ReportSet` per evaluation set or search.

Built from an evaluation's per-set result (:func:`from_set_result`: ranks, ground truth, E/M/H scores) or
from a search without ground truth (:func:`from_search`). Labels follow the revisited protocol (protocol.md):
a database image is ``easy``, ``hard`` or ``junk`` for a query by its ground truth, ``negative`` otherwise;
search results have no ground truth and are ``result``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SETUPS = ("E", "M", "H")
LABELS = ("easy", "hard", "junk", "negative", "result")


@dataclass
class Hit:
    """One database image in a query's list: its 1-based rank (None: beyond the ranks kept), the database
    index (images past the set's own database are distractors), its similarity when known, and its label."""

    db: int
    rank: int | None
    label: str
    score: float | None = None


@dataclass
class QueryEntry:
    index: int  # the query's position in its set
    name: str
    path: str | None
    box: list[float] | None  # x0, y0, x1, y1 in the upright image's pixels (the ground truth's bbx)
    ap: dict[str, float | None] | None  # per setup, None where the setup has no positive for this query
    results: list[Hit]
    missed: list[Hit] = field(default_factory=list)  # positives not in ``results``, with their ranks if kept
    cropped: bool = False  # the model saw the query cropped to ``box`` (the protocol's default)


@dataclass
class ReportSet:
    name: str
    protocol: dict[str, Any]
    table: dict[str, dict[str, float]] | None  # setup -> {"mAP": .., "mP@1": ..}; None without ground truth
    queries: list[QueryEntry]
    database_paths: Sequence[str]  # the set's own database; indices past it are distractors (no image)
    database_names: Sequence[str]
    kept_ranks: (
        int  # how many places of each ranking are known (ranks of missed positives beyond are unknown)
    )
    notes: list[str] = field(default_factory=list)

    def worst_first(self) -> list[QueryEntry]:
        """Queries by ascending AP (Medium, then Hard, then Easy); queries without any AP last."""

        def key(q: QueryEntry) -> tuple:
            ap = q.ap or {}
            vals = [ap.get(s) for s in ("M", "H", "E")]
            return (all(v is None for v in vals), *[(v is None, v or 0.0) for v in vals], q.index)

        return sorted(self.queries, key=key)


def _finite_or_none(v: float) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


def score_table(scores: Any) -> dict[str, dict[str, float]]:
    """E/M/H rows of ``RevisitedScores`` (``map``, ``mpk`` in percent): {"E": {"mAP": .., ...}, ...}."""
    table = {}
    for s in SETUPS:
        row = {"mAP": float(scores.map[s])}
        row.update({f"mP@{k}": float(v) for k, v in sorted(scores.mpk[s].items())})
        table[s] = row
    return table


def _label_of(gnd: Mapping) -> dict[int, str]:
    labels: dict[int, str] = {}
    for kind in ("junk", "hard", "easy"):  # a database image listed twice takes the stronger label
        for i in gnd.get(kind) or ():
            labels[int(i)] = kind
    return labels


def from_set_result(result: Any, top_k: int = 10) -> ReportSet:
    """The browser's view of one evaluation set (``dalg.retrieval.evaluation.SetResult``: name, scores, ranks,
    protocol, query_paths, query_boxes, database_paths, gnd): per query its AP in E/M/H, its first ``top_k``
    results labelled easy/hard/junk/negative, and the positives (easy and hard) not among them with their rank
    when it lies within the kept ranks."""
    ranks = np.asarray(result.ranks)
    n_q = len(result.query_paths)
    if ranks.ndim != 2 or ranks.shape[0] != n_q:
        raise ValueError(f"set {result.name}: ranks of shape {ranks.shape} for {n_q} queries")
    if len(result.gnd) != n_q:
        raise ValueError(f"set {result.name}: {len(result.gnd)} ground-truth entries for {n_q} queries")
    top_k = max(1, min(int(top_k), ranks.shape[1]))
    cropped = result.query_boxes is not None  # None: queries were not cropped; the gnd's box is still shown
    boxes = result.query_boxes if cropped else [g.get("bbx") for g in result.gnd]
    aps = result.scores.aps
    queries = []
    for q in range(n_q):
        labels = _label_of(result.gnd[q])
        row = ranks[q].tolist()
        place = {}
        for r, db in enumerate(row):
            place.setdefault(int(db), r + 1)
        shown = [Hit(int(db), r + 1, labels.get(int(db), "negative")) for r, db in enumerate(row[:top_k])]
        shown_ids = {h.db for h in shown}
        positives = [i for i, kind in labels.items() if kind in ("easy", "hard") and i not in shown_ids]
        missed = sorted(
            (Hit(i, place.get(i), labels[i]) for i in positives),
            key=lambda h: (h.rank is None, h.rank or 0, h.db),
        )
        box = boxes[q]
        queries.append(
            QueryEntry(
                index=q,
                name=_name(result.query_paths[q]),
                path=str(result.query_paths[q]),
                box=None if box is None else [float(v) for v in box],
                ap={s: _finite_or_none(aps[s][q]) for s in SETUPS if s in aps},
                results=shown,
                missed=missed,
                cropped=cropped and box is not None,
            )
        )
    notes = []
    if getattr(result.scores, "truncated", False):
        notes.append("truncated top-k ranking: positives outside the top-k count as misses")
    paths = [str(p) for p in result.database_paths]
    return ReportSet(
        name=str(result.name),
        protocol=dict(result.protocol or {}),
        table=score_table(result.scores),
        queries=queries,
        database_paths=paths,
        database_names=[_name(p) for p in paths],
        kept_ranks=int(ranks.shape[1]),
        notes=notes,
    )


def from_search(
    name: str,
    query_paths: Sequence[str],
    ranks: np.ndarray,
    scores: np.ndarray,
    database_paths: Sequence[str],
    database_names: Sequence[str],
    protocol: Mapping[str, Any] | None = None,
) -> ReportSet:
    """The browser's view of a search without ground truth: each query's results with their similarity."""
    ranks, scores = np.asarray(ranks), np.asarray(scores)
    if ranks.shape != scores.shape or ranks.ndim != 2 or ranks.shape[0] != len(query_paths):
        raise ValueError(
            f"search {name}: ranks {ranks.shape} and scores {scores.shape} for {len(query_paths)} queries"
        )
    queries = [
        QueryEntry(
            index=q,
            name=_name(p),
            path=str(p),
            box=None,
            ap=None,
            results=[
                Hit(int(db), r + 1, "result", float(s)) for r, (db, s) in enumerate(zip(ranks[q], scores[q]))
            ],
        )
        for q, p in enumerate(query_paths)
    ]
    return ReportSet(
        name=name,
        protocol=dict(protocol or {}),
        table=None,
        queries=queries,
        database_paths=database_paths,
        database_names=database_names,
        kept_ranks=int(ranks.shape[1]),
    )


def _name(path: Any) -> str:
    return str(path).replace("\\", "/").rsplit("/", 1)[-1]
