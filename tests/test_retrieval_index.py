"""Exact chunked inner-product search: agrees with brute force, ties by lower index, memmap input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dalg.retrieval.index import rank_by_similarity, search, take_rows


def _normalised(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute(q: np.ndarray, db: np.ndarray, k: int) -> np.ndarray:
    return rank_by_similarity(q @ db.T)[:, :k]


@pytest.mark.parametrize("chunk_size", [7, 64, 65536])
@pytest.mark.parametrize("k", [1, 10, None])
def test_search_matches_brute_force(chunk_size: int, k: int | None) -> None:
    rng = np.random.default_rng(1)
    db, q = _normalised(rng, 200, 16), _normalised(rng, 9, 16)
    scores, ranks = search(q, db, k, chunk_size=chunk_size)
    kk = 200 if k is None else k
    assert ranks.shape == (9, kk) and scores.shape == (9, kk)
    assert ranks.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(ranks, _brute(q, db, kk))
    np.testing.assert_allclose(scores, np.take_along_axis(q @ db.T, ranks, 1), atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 60),
    k=st.integers(1, 60),
    chunk=st.integers(1, 25),
    seed=st.integers(0, 2**31),
)
def test_ties_are_broken_by_lower_index(n: int, k: int, chunk: int, seed: int) -> None:
    # Few distinct database vectors -> many exactly equal scores, including ties around the k-th place.
    rng = np.random.default_rng(seed)
    k = min(k, n)
    protos = np.eye(4, dtype=np.float32)
    db = protos[rng.integers(0, 4, size=n)]
    q = protos[rng.integers(0, 4, size=3)]
    scores, ranks = search(q, db, k, chunk_size=chunk)
    np.testing.assert_array_equal(ranks, _brute(q, db, k))


def test_fp16_memmap_database(tmp_path) -> None:
    rng = np.random.default_rng(2)
    db = _normalised(rng, 500, 32).astype(np.float16)
    q = _normalised(rng, 5, 32)
    path = tmp_path / "db.npy"
    np.save(path, db)
    mm = np.load(path, mmap_mode="r")
    assert isinstance(mm, np.memmap)
    for k in (20, None):  # read with file reads (the whole map) and by slicing (a sliced map)
        _, ranks = search(q, mm, k, chunk_size=128)
        np.testing.assert_array_equal(ranks, _brute(q, db.astype(np.float32), k or 500))
        _, ranks = search(q, mm[100:], k and 10, chunk_size=128)
        np.testing.assert_array_equal(ranks, _brute(q, db[100:].astype(np.float32), k and 10 or 400))


def test_bad_input() -> None:
    q = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="dimension mismatch"):
        search(q, np.zeros((5, 4), np.float32))
    with pytest.raises(ValueError, match="k must be"):
        search(q, np.zeros((5, 8), np.float32), k=6)
    with pytest.raises(ValueError, match="empty"):
        search(q, np.zeros((0, 8), np.float32))
    db = np.ones((5, 8), np.float32)
    db[3, 2] = np.nan
    for k in (2, None):
        with pytest.raises(ValueError, match=r"not finite.*\[3\]"):
            search(q, db, k)
    with pytest.raises(ValueError, match="query descriptors are not finite"):
        search(np.full((1, 8), np.inf, np.float32), np.ones((5, 8), np.float32))


@pytest.mark.parametrize("k", [5, None])
def test_database_in_parts_is_indexed_in_order(tmp_path, k) -> None:
    # a set's own database followed by a distractor file: one index space, parts in order
    rng = np.random.default_rng(3)
    own, dis, q = _normalised(rng, 30, 8), _normalised(rng, 70, 8).astype(np.float16), _normalised(rng, 4, 8)
    np.save(tmp_path / "dis.npy", dis)
    parts = [own, np.load(tmp_path / "dis.npy", mmap_mode="r")]
    full = np.concatenate([own, dis.astype(np.float32)])
    _, ranks = search(q, parts, k, chunk_size=16)
    np.testing.assert_array_equal(ranks, _brute(q, full, k or 100))
    idx = np.array([[0, 29, 30], [99, 31, 0]])
    np.testing.assert_array_equal(take_rows(parts, idx), full[idx])
    with pytest.raises(IndexError, match="outside"):
        take_rows(parts, np.array([100]))


@settings(max_examples=80, deadline=None)
@given(
    nq=st.integers(1, 5),
    n=st.integers(1, 200),
    levels=st.integers(1, 1000),
    nan=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_rank_by_similarity_equals_the_stable_sort(
    nq: int, n: int, levels: int, nan: bool, seed: int
) -> None:
    # fast SIMD argsort + tie repair must give exactly NumPy's stable order (ties by lower index), NaN last
    rng = np.random.default_rng(seed)
    sim = (rng.integers(0, levels, size=(nq, n)) / levels).astype(np.float32)
    if nan:
        sim[0, rng.integers(0, n, size=3)] = np.nan
    np.testing.assert_array_equal(rank_by_similarity(sim), np.argsort(-sim, axis=1, kind="stable"))


def test_full_ranking_that_cannot_fit_says_so(monkeypatch) -> None:
    import dalg.retrieval.index as index_mod

    monkeypatch.setattr(index_mod, "_available_memory", lambda: 1000)
    q = np.ones((3, 4), np.float32)
    with pytest.raises(MemoryError, match="top-k"):
        search(q, np.ones((100, 4), np.float32))
    assert search(q, np.ones((100, 4), np.float32), 5)[1].shape == (3, 5)  # top-k needs no full matrix
