"""``rank_and_score``: every route (full from similarities, top-k, re-ranking, + distractors) scores like the
plain path (full argsort, then the ranked metric), and re-ranking works on a database given in parts."""

from __future__ import annotations

import numpy as np
import pytest

from dalg.retrieval.evaluation import RankingOptions, rank_and_score
from dalg.retrieval.index import rank_by_similarity, topk_from_similarity
from dalg.retrieval.metrics import evaluate_revisited
from dalg.retrieval.rerank import rerank_topk


def _normalised(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _problem(seed: int = 0, nq: int = 6, ndb: int = 80, d: int = 16):
    rng = np.random.default_rng(seed)
    db = _normalised(rng, ndb, d)
    q = _normalised(rng, nq, d)
    db[10] = db[11]  # exact ties in the database
    gnd = []
    for _ in range(nq):
        perm = rng.permutation(ndb)
        gnd.append({"easy": perm[:3].tolist(), "hard": perm[3:6].tolist(), "junk": perm[6:8].tolist()})
    gnd[0]["easy"] += [10, 11]
    return q, db, gnd


def _reference(q, parts, gnd, kappas=(1, 5, 10)):
    full = np.concatenate(parts, 0)
    ranks = rank_by_similarity(q @ full.T)
    return evaluate_revisited(ranks, gnd, kappas, n_database=full.shape[0]), ranks


def test_full_route_scores_from_similarities_like_the_ranked_metric() -> None:
    q, db, gnd = _problem()
    scores, ranks, protocol = rank_and_score(q, db, gnd, keep_ranks=20)
    ref, ref_ranks = _reference(q, [db], gnd)
    assert scores.as_dict() == pytest.approx(ref.as_dict(), abs=1e-9)
    np.testing.assert_array_equal(ranks, ref_ranks[:, :20])
    assert protocol["ranking"] == "full" and protocol["database"] == 80


def test_full_route_with_distractors_indexes_them_after_the_database() -> None:
    q, db, gnd = _problem(1)
    dis = _normalised(np.random.default_rng(5), 50, db.shape[1])
    scores, ranks, protocol = rank_and_score(q, db, gnd, dis, keep_ranks=130)
    ref, ref_ranks = _reference(q, [db, dis], gnd)
    assert scores.as_dict() == pytest.approx(ref.as_dict(), abs=1e-9)
    np.testing.assert_array_equal(ranks, ref_ranks)
    assert protocol["distractors"] == 50


@pytest.mark.parametrize("k", [1, 7, 40])
def test_topk_from_similarity_is_the_head_of_the_stable_ranking(k: int) -> None:
    rng = np.random.default_rng(k)
    sim = rng.integers(0, 5, size=(9, 60)).astype(np.float32)  # many ties, also at the k-th place
    np.testing.assert_array_equal(topk_from_similarity(sim, k), rank_by_similarity(sim)[:, :k])


@pytest.mark.parametrize("top_k", [None, 30])
def test_rerank_on_database_parts(top_k) -> None:
    """``ranking.rerank=true`` used to crash: the database reaches the re-ranker as a list of parts."""
    q, db, gnd = _problem(2)
    dis = _normalised(np.random.default_rng(9), 40, db.shape[1])
    options = RankingOptions(top_k=top_k, rerank=True, rerank_k=20, qe_n=2, dba_n=2)
    scores, ranks, protocol = rank_and_score(q, db, gnd, dis, options)
    full = np.concatenate([db, dis], 0)
    _, base = _reference(q, [db, dis], gnd)
    base = base if top_k is None else base[:, :top_k]
    expected = rerank_topk(q, full, base, k=20, qe_n=2, dba_n=2, alpha=3.0)
    np.testing.assert_array_equal(ranks, expected)
    ref = evaluate_revisited(expected, gnd, (1, 5, 10), n_database=full.shape[0])
    assert scores.as_dict() == pytest.approx(ref.as_dict(), abs=1e-9)
    assert protocol["rerank"].startswith("alpha-QE")
    assert not np.array_equal(expected[:, :20], base[:, :20])  # the shortlist really was re-ordered


def test_rerank_reads_parts_like_one_array() -> None:
    q, db, _ = _problem(3)
    _, ranks = _reference(q, [db], [{"easy": [], "hard": [], "junk": []}] * len(q))
    np.testing.assert_array_equal(
        rerank_topk(q, [db[:30], db[30:]], ranks, k=15), rerank_topk(q, db, ranks, k=15)
    )
