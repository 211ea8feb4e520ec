"""alpha-QE / DBA re-ranking: off = identity, fixes a planted 'chain' case, only the shortlist moves."""

from __future__ import annotations

import numpy as np
import pytest

from dalg.retrieval.index import search
from dalg.retrieval.rerank import alpha_query_expansion, database_side_augmentation, rerank_topk


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _chain_case() -> tuple[np.ndarray, np.ndarray]:
    # query q; A (idx 0) is close to q; B (idx 1) is a second view close to A but farther from q than the
    # distractor C (idx 2). Expanding q with A must lift B above C.
    q = _unit([[1.0, 0.0, 0.0]])
    a = _unit([1.0, 0.3, 0.0])
    b = _unit([1.0, 1.2, 0.0])
    c = _unit([1.0, 0.0, 1.05])
    return q, np.stack([a, b, c])


def test_alpha_qe_lifts_a_second_view() -> None:
    q, db = _chain_case()
    _, ranks = search(q, db)
    assert ranks[0].tolist() == [0, 2, 1]  # before: distractor C above B
    new = rerank_topk(q, db, ranks, k=3, qe_n=1, dba_n=0, alpha=1.0)
    assert new[0].tolist() == [0, 1, 2]


def test_disabled_rerank_is_the_identity() -> None:
    q, db = _chain_case()
    _, ranks = search(q, db)
    np.testing.assert_array_equal(rerank_topk(q, db, ranks, qe_n=0, dba_n=0), ranks)


def test_only_the_shortlist_is_reordered() -> None:
    rng = np.random.default_rng(0)
    db = _unit(rng.standard_normal((50, 8)))
    q = _unit(rng.standard_normal((4, 8)))
    _, ranks = search(q, db)
    new = rerank_topk(q, db, ranks, k=10, qe_n=3, dba_n=2)
    np.testing.assert_array_equal(new[:, 10:], ranks[:, 10:])
    assert all(sorted(a) == sorted(b) for a, b in zip(new[:, :10], ranks[:, :10]))


def test_alpha_qe_formula() -> None:
    q = _unit([[1.0, 0.0]])
    nb = _unit([[[0.6, 0.8]]])
    out = alpha_query_expansion(q, nb, alpha=2.0)
    expected = _unit(q[0] + 0.6**2 * nb[0, 0])
    np.testing.assert_allclose(out[0], expected, atol=1e-6)


def test_global_dba_uses_neighbours_not_self() -> None:
    db = _unit([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    out = database_side_augmentation(db, n=1, alpha=1.0)
    # row 0's nearest other vector is row 1 (sim 0.8)
    np.testing.assert_allclose(out[0], _unit(db[0] + 0.8 * db[1]), atol=1e-6)
    # duplicates: the twin counts as a neighbour, the row itself does not
    twin = np.concatenate([db[:1], db[:1]])
    np.testing.assert_allclose(database_side_augmentation(twin, n=1), twin, atol=1e-6)


def test_bad_ranks_shape() -> None:
    with pytest.raises(ValueError, match="ranks must be"):
        rerank_topk(np.zeros((2, 3), np.float32), np.zeros((5, 3), np.float32), np.zeros((3, 5), int))
