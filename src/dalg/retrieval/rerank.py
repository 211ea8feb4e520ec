"""Optional re-ranking of a top-k shortlist: alpha query expansion (alpha-QE) and database-side augmentation (DBA).

Both follow Radenović, Tolias & Chum (TPAMI 2019, "Fine-tuning CNN image retrieval with no human
annotation", Sec. 5.2): a vector is replaced by the L2-normalised, similarity-weighted sum of itself and its
top neighbours, the weights being ``sim ** alpha`` (the vector itself has weight 1).

* alpha-QE: each query is expanded with its ``qe_n`` best-ranked database vectors.
* DBA: each database vector is expanded with its ``dba_n`` nearest database neighbours. Exact global DBA needs
  a database x database search; :func:`database_side_augmentation` does it (chunked, via :func:`search`)
  for databases that allow it. :func:`rerank_topk` instead applies DBA *within each query's shortlist*
  (neighbours among the same top-k), so its cost stays ``n_queries * k^2 * dim`` whatever the database size.

Only the order of the top-k shortlist changes; everything after it stays as it was. Off by default
(``conf/eval.yaml``: ``ranking.rerank: false``); published protocol numbers are without re-ranking.
"""

from __future__ import annotations

import numpy as np

from dalg.retrieval.index import Database, search, take_rows


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _weights(sim: np.ndarray, alpha: float) -> np.ndarray:
    return np.clip(sim, 0.0, None) ** alpha  # negative similarities would give undefined powers


def alpha_query_expansion(queries: np.ndarray, neighbours: np.ndarray, alpha: float = 3.0) -> np.ndarray:
    """``queries (nq, d)``; ``neighbours (nq, n, d)`` best first. Returns the expanded, normalised queries."""
    queries = np.asarray(queries, dtype=np.float32)
    if neighbours.shape[1] == 0:
        return queries.copy()
    sim = np.einsum("qd,qnd->qn", queries, neighbours)
    w = _weights(sim, alpha)
    return _normalise(queries + np.einsum("qn,qnd->qd", w, neighbours)).astype(np.float32)


def database_side_augmentation(
    database: np.ndarray, n: int = 2, alpha: float = 3.0, chunk_size: int = 65536
) -> np.ndarray:
    """Global DBA: every database vector expanded with its ``n`` nearest database neighbours (excluding itself).

    Needs the database in memory and a database x database search; meant for ROxford/RParis-sized sets.
    """
    db = np.asarray(database, dtype=np.float32)
    if n <= 0:
        return db.copy()
    k = min(n + 1, db.shape[0])
    sims, ranks = search(db, db, k, chunk_size=chunk_size)
    # the first min(n, k-1) results that are not the vector itself (a duplicate may outrank it)
    not_self = ranks != np.arange(db.shape[0])[:, None]
    order = np.argsort(~not_self, axis=1, kind="stable")[:, : min(n, k - 1)]
    nb = np.take_along_axis(ranks, order, 1)
    w = _weights(np.take_along_axis(sims, order, 1), alpha)
    out = db + np.einsum("in,ind->id", w, db[nb])
    return _normalise(out).astype(np.float32)


def rerank_topk(
    queries: np.ndarray,
    database: Database,
    ranks: np.ndarray,
    k: int = 100,
    qe_n: int = 2,
    dba_n: int = 2,
    alpha: float = 3.0,
) -> np.ndarray:
    """Re-rank the first ``k`` columns of ``ranks`` with shortlist DBA then alpha-QE; returns new ranks.

    ``database`` may be a memory map or a sequence of parts (as in :func:`search`): only the shortlisted rows
    are read. Ties in the new scores keep the
    original shortlist order (stable sort).
    """
    queries = np.asarray(queries, dtype=np.float32)
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[0] != queries.shape[0]:
        raise ValueError(f"ranks must be (n_queries={queries.shape[0]}, k), got {ranks.shape}")
    k = min(int(k), ranks.shape[1])
    if k <= 1 or (qe_n <= 0 and dba_n <= 0):
        return ranks.copy()
    short = ranks[:, :k]
    vecs = take_rows(database, short)  # (nq, k, d) fp32; each shortlisted row read once, across parts

    if dba_n > 0:
        m = min(dba_n, k - 1)
        gram = np.einsum("qid,qjd->qij", vecs, vecs)
        idx = np.arange(k)
        gram[:, idx, idx] = -np.inf  # exclude self; it is added with weight 1 below
        nn = np.argsort(-gram, axis=2, kind="stable")[:, :, :m]  # (nq, k, m)
        w = _weights(np.take_along_axis(gram, nn, 2), alpha)
        neigh = np.take_along_axis(vecs[:, None, :, :], nn[..., None], axis=2)  # (nq, k, m, d)
        vecs = _normalise(vecs + np.einsum("qkm,qkmd->qkd", w, neigh)).astype(np.float32)

    q = queries
    if qe_n > 0:
        order = np.argsort(-np.einsum("qd,qkd->qk", q, vecs), axis=1, kind="stable")[:, : min(qe_n, k)]
        q = alpha_query_expansion(q, np.take_along_axis(vecs, order[..., None], 1), alpha)
    new = np.einsum("qd,qkd->qk", q, vecs)
    order = np.argsort(-new, axis=1, kind="stable")
    out = ranks.copy()
    out[:, :k] = np.take_along_axis(short, order, 1)
    return out
