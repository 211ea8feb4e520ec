"""Positions and top-k from per-row value buckets (dalg.retrieval.row_buckets) against a full stable ranking."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dalg.retrieval.row_buckets as rb
from dalg.retrieval.index import rank_by_similarity, similarity_matrix


def _expected(sim: np.ndarray, rows: np.ndarray, items: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ranks = rank_by_similarity(sim)  # stable, ties by lower index: the contract
    where = np.argsort(ranks, axis=1, kind="stable")  # where[r, i] = position of item i in row r
    return where[rows, items], ranks[:, :k]


def _matrix(rng: np.random.Generator, kind: str, nq: int, n: int) -> np.ndarray:
    if kind == "normal":
        return rng.standard_normal((nq, n)).astype(np.float32)
    if kind == "few_levels":  # many exact ties, also across buckets' edges
        return rng.integers(0, 4, (nq, n)).astype(np.float32) * np.float32(0.1)
    if kind == "signed_zeros":  # -0.0 == 0.0: equal values, ordered by index
        return np.where(rng.random((nq, n)) < 0.5, -0.0, 0.0) + (rng.random((nq, n)) < 0.2)
    if kind == "float16":
        return rng.standard_normal((nq, n)).astype(np.float16)
    if kind == "tiny_spread":  # values 1e-12 apart around 1000: no cancellation may merge them
        return 1000.0 + rng.integers(0, 50, (nq, n)) * 1e-12
    if kind == "extreme_range":  # the row's span overflows float32: the sort fallback
        sim = rng.standard_normal((nq, n)).astype(np.float32)
        sim[:, 0], sim[:, -1] = 3e38, -3e38
        return sim
    if kind == "denormals":
        return (rng.integers(0, 5, (nq, n)) * 5e-324).astype(np.float64)
    raise AssertionError(kind)


KINDS = ["normal", "few_levels", "signed_zeros", "float16", "tiny_spread", "extreme_range", "denormals"]


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(KINDS),
    st.integers(1, 7),
    st.integers(1, 120),
    st.integers(0, 300),
    st.integers(0, 130),
    st.sampled_from([None, 1, 3, 64]),
    st.integers(0, 2**31 - 1),
)
def test_positions_and_top_k_equal_the_stable_ranking(kind, nq, n, n_pairs, k, n_buckets, seed) -> None:
    rng = np.random.default_rng(seed)
    sim = _matrix(rng, kind, nq, n)
    keys = np.unique(rng.integers(0, nq * n, n_pairs))
    keys = keys[rng.permutation(keys.size)]  # pairs in any order
    rows, items = keys // n, keys % n
    pos, head = rb.positions_and_top_k(sim, rows, items, k, n_buckets=n_buckets)
    want_pos, want_head = _expected(sim, rows, items, min(k, n))
    np.testing.assert_array_equal(pos, want_pos)
    if k == 0:
        assert head is None
    else:
        np.testing.assert_array_equal(head, want_head)


def test_blocks_and_the_crowded_bucket_fallback(monkeypatch) -> None:
    rng = np.random.default_rng(0)
    sim = rng.integers(0, 2, (13, 400)).astype(np.float32)  # two values: every bucket asked for is crowded
    rows, items = np.repeat(np.arange(13), 40), rng.integers(0, 400, 13 * 40)
    keys = np.unique(rows * 400 + items)
    rows, items = keys // 400, keys % 400
    calls = []
    original = rb._positions_by_sort
    monkeypatch.setattr(rb, "_positions_by_sort", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(rb, "_BLOCK_CELLS", 3 * 400)  # blocks of 3 rows: 5 blocks, the last one short
    pos, head = rb.positions_and_top_k(sim, rows, items, 25)
    want_pos, want_head = _expected(sim, rows, items, 25)
    np.testing.assert_array_equal(pos, want_pos)
    np.testing.assert_array_equal(head, want_head)
    assert len(calls) == 5  # every block took the fallback, and it is exact too


def test_a_realistic_matrix_takes_the_bucket_route(monkeypatch) -> None:
    rng = np.random.default_rng(1)
    q = rng.standard_normal((20, 64)).astype(np.float32)
    db = rng.standard_normal((3000, 64)).astype(np.float32)
    sim = similarity_matrix(q, db)
    monkeypatch.setattr(rb, "_positions_by_sort", lambda *a: pytest.fail("fell back to sorting"))
    rows, items = np.repeat(np.arange(20), 30), rng.integers(0, 3000, 600)
    keys = np.unique(rows * 3000 + items)
    rows, items = keys // 3000, keys % 3000
    pos, head = rb.positions_and_top_k(sim, rows, items, 100)
    want_pos, want_head = _expected(sim, rows, items, 100)
    np.testing.assert_array_equal(pos, want_pos)
    np.testing.assert_array_equal(head, want_head)
    np.testing.assert_array_equal(rb.top_k(sim, 7), want_head[:, :7])


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="NaN or infinite"):
        rb.positions_and_top_k(np.array([[0.1, np.nan, 0.3]]), np.array([0]), np.array([0]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        rb.top_k(np.array([[0.1, 0.2], [np.inf, 0.3]]), 1)
    with pytest.raises(ValueError, match="outside the 1 x 3"):
        rb.positions_and_top_k(np.zeros((1, 3)), np.array([0]), np.array([3]))
    with pytest.raises(ValueError, match="2-D float"):
        rb.positions_and_top_k(np.zeros((2, 3), dtype=np.int64), np.array([0]), np.array([0]))


def test_similarity_matrix_names_what_is_not_finite() -> None:
    q = np.ones((2, 4), dtype=np.float32)
    db = np.ones((6, 4), dtype=np.float32)
    db[4, 1] = np.nan
    with pytest.raises(ValueError, match=r"not finite \(NaN/inf\), e.g. rows \[4\]"):
        similarity_matrix(q, db, chunk_size=3)
    db[4, 1] = 3e38  # finite descriptors whose products overflow float32
    with pytest.raises(ValueError, match="rows 3..5 overflow float32"):
        similarity_matrix(q * 10, db, chunk_size=3)
