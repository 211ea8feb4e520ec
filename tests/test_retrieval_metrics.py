"""Revisited mAP / mP@k against hand-computed cases and a plain per-query reference (protocol.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dalg.retrieval.index import rank_by_similarity
from dalg.retrieval.metrics import evaluate_revisited, evaluate_revisited_from_similarity, format_table

# ----------------------------------------------------------------------------------------------------------
# Plain reference: one query at a time, Python loops, written straight from protocol.md.


def _reference_query(ranking: list[int], ok: list[int], junk: list[int], kappas) -> tuple[float, list[float]]:
    if len(ok) == 0:
        return math.nan, [math.nan] * len(kappas)
    ok_set, junk_set = set(ok), set(junk)
    pos: list[int] = []
    n_junk_seen = 0
    for position, item in enumerate(ranking):
        if item in ok_set:
            pos.append(position - n_junk_seen)
        if item in junk_set:
            n_junk_seen += 1
    ap = 0.0
    for j, r in enumerate(pos):
        p0 = 1.0 if r == 0 else j / r
        p1 = (j + 1) / (r + 1)
        ap += (p0 + p1) / 2 / len(ok)
    prec = []
    for k in kappas:
        if not pos:
            prec.append(0.0)
            continue
        pos1 = [p + 1 for p in pos]
        kq = min(max(pos1), k)
        prec.append(sum(p <= kq for p in pos1) / kq)
    return ap, prec


def _reference(ranks: np.ndarray, gnd, kappas=(1, 5, 10)) -> dict[str, float]:
    setups = {
        "E": lambda g: (list(g["easy"]), list(g["junk"]) + list(g["hard"])),
        "M": lambda g: (list(g["easy"]) + list(g["hard"]), list(g["junk"])),
        "H": lambda g: (list(g["hard"]), list(g["junk"]) + list(g["easy"])),
    }
    out = {}
    for name, split in setups.items():
        aps, precs = [], []
        for i, g in enumerate(gnd):
            ok, junk = split(g)
            ap, pr = _reference_query([int(x) for x in ranks[i]], ok, junk, kappas)
            if not math.isnan(ap):
                aps.append(ap)
                precs.append(pr)
        out[f"mAP_{name}"] = 100 * float(np.mean(aps)) if aps else math.nan
        for t, k in enumerate(kappas):
            out[f"mP@{k}_{name}"] = 100 * float(np.mean([p[t] for p in precs])) if precs else math.nan
    return out


def _assert_close(a: dict[str, float], b: dict[str, float]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if math.isnan(b[key]):
            assert math.isnan(a[key]), key
        else:
            assert a[key] == pytest.approx(b[key], abs=1e-9), key


# ----------------------------------------------------------------------------------------------------------
# Hand-computed cases


def test_trapezoid_ap_positives_at_0_and_2() -> None:
    # protocol.md: positives at ranks 0 and 2 give 0.7917 (finite-sum AP would give 0.8333)
    ranks = np.array([[5, 3, 7, 1, 0, 2, 4, 6]])
    gnd = [{"easy": [5, 7], "hard": [], "junk": []}]
    s = evaluate_revisited(ranks, gnd)
    assert s.aps["E"][0] == pytest.approx((1.0 + (1 / 2 + 2 / 3) / 2) / 2)
    assert s.map["E"] == pytest.approx(79.1667, abs=1e-3)
    assert s.map["M"] == pytest.approx(79.1667, abs=1e-3)
    assert math.isnan(s.aps["H"][0]) and math.isnan(s.map["H"])  # no hard positive: skipped
    # 1-based positions 1 and 3: P@1 = 1, P@5 = P@10 = 2/3 (denominator clipped at 3)
    assert s.mpk["E"] == pytest.approx({1: 100.0, 5: 200 / 3, 10: 200 / 3})
    assert not s.truncated


def test_junk_is_removed_from_the_ranking() -> None:
    # junk at 0 and 2 -> the positives at raw positions 1 and 4 become 0 and 2
    ranks = np.array([[9, 5, 8, 3, 7, 0, 1, 2, 4, 6]])
    gnd = [{"easy": [5, 7], "hard": [], "junk": [9, 8]}]
    s = evaluate_revisited(ranks, gnd)
    assert s.map["E"] == pytest.approx(79.1667, abs=1e-3)


def test_setups_treat_easy_and_hard_differently() -> None:
    # ranking: hard(1), other, easy(2), junk(3), other
    ranks = np.array([[1, 0, 2, 3, 4]])
    gnd = [{"easy": [2], "hard": [1], "junk": [3]}]
    s = evaluate_revisited(ranks, gnd)
    # Easy: hard is ignored -> [0, 2, 4]: easy at position 1 -> (0/1 + 1/2) / 2
    assert s.aps["E"][0] == pytest.approx(0.25)
    assert s.aps["H"][0] == pytest.approx(1.0)  # hard at position 0
    # Medium: positives at 0 and 2 -> 0.7917
    assert s.aps["M"][0] == pytest.approx(0.791667, abs=1e-6)


def test_query_without_positive_is_skipped_in_the_mean() -> None:
    ranks = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    gnd = [
        {"easy": [0], "hard": [1], "junk": []},
        {"easy": [], "hard": [0], "junk": []},  # no easy positive: skipped for Easy
    ]
    s = evaluate_revisited(ranks, gnd)
    assert math.isnan(s.aps["E"][1])
    assert s.map["E"] == pytest.approx(100.0)  # mean over query 0 only
    # Hard: query 0 hard at 1 after removing easy (ignored) -> position 0 -> AP 1; query 1 hard at 3 -> AP 1/4*...
    assert s.aps["H"][1] == pytest.approx((1 / 4) / 2)
    assert s.map["H"] == pytest.approx(100 * (1.0 + 0.125) / 2)


def test_truncated_ranking_counts_missing_positives() -> None:
    ranks = np.array([[5, 3, 7]])  # top-3 of a 10-image database
    gnd = [{"easy": [5, 7, 9], "hard": [], "junk": []}]
    s = evaluate_revisited(ranks, gnd, n_database=10)
    assert s.truncated
    assert s.aps["E"][0] == pytest.approx((1.0 + (1 / 2 + 2 / 3) / 2) / 3)
    # a query whose positives all fall outside the top-k: AP 0, P@k 0
    s2 = evaluate_revisited(ranks, [{"easy": [9], "hard": [], "junk": []}], n_database=10)
    assert s2.aps["E"][0] == 0.0 and s2.mpk["E"][1] == 0.0


def test_as_dict_keys_and_table() -> None:
    ranks = np.array([[0, 1, 2]])
    s = evaluate_revisited(ranks, [{"easy": [0], "hard": [2], "junk": [1]}])
    d = s.as_dict()
    assert list(d)[:3] == ["mAP_E", "mAP_M", "mAP_H"]
    assert {f"mP@{k}_{x}" for k in (1, 5, 10) for x in "EMH"} <= d.keys()
    assert "Medium" in format_table(s)


@pytest.mark.parametrize(
    "ranks, gnd, n_database, match",
    [
        (np.array([[0, 1]]), [{"easy": [2], "hard": [], "junk": []}], None, "outside the database"),
        (np.array([[0, 5]]), [{"easy": [0], "hard": [], "junk": []}], 3, "outside"),
        (np.array([[0, -1]]), [{"easy": [0], "hard": [], "junk": []}], 3, "outside"),
        (np.array([[0, 1]]), [{"easy": [0], "hard": []}], None, "junk"),
        (np.array([[0, 1]]), [], None, "gnd has 0"),
        (np.array([0, 1]), [{"easy": [0], "hard": [], "junk": []}], None, "n_queries"),
        (np.array([[0.0, 1.0]]), [{"easy": [0], "hard": [], "junk": []}], None, "integer"),
    ],
)
def test_bad_input_is_rejected(ranks, gnd, n_database, match) -> None:
    with pytest.raises((ValueError, KeyError, TypeError), match=match):
        evaluate_revisited(ranks, gnd, n_database=n_database)


def test_sorted_key_path_matches_dense_table(monkeypatch) -> None:
    rng = np.random.default_rng(0)
    nq, ndb = 6, 300
    ranks = np.stack([rng.permutation(ndb) for _ in range(nq)])
    gnd = [
        {
            k: rng.choice(ndb, size=rng.integers(0, 8), replace=False).tolist()
            for k in ("easy", "hard", "junk")
        }
        for _ in range(nq)
    ]
    dense = evaluate_revisited(ranks[:, :50], gnd, n_database=ndb).as_dict()
    import dalg.retrieval.metrics as m

    monkeypatch.setattr(m, "_DENSE_TABLE_MAX_CELLS", 0)
    _assert_close(evaluate_revisited(ranks[:, :50], gnd, n_database=ndb).as_dict(), dense)
    _assert_close(dense, _reference(ranks[:, :50], gnd))


# ----------------------------------------------------------------------------------------------------------
# Property tests against the reference


@st.composite
def _problems(draw):
    ndb = draw(st.integers(1, 40))
    nq = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    gnd = []
    for _ in range(nq):
        # disjoint easy/hard/junk as in the real files, sometimes empty lists
        perm = rng.permutation(ndb)
        ne, nh, nj = (int(rng.integers(0, max(1, ndb // 3) + 1)) for _ in range(3))
        gnd.append(
            {
                "easy": perm[:ne].tolist(),
                "hard": perm[ne : ne + nh].tolist(),
                "junk": perm[ne + nh : ne + nh + nj].tolist(),
                "bbx": [0.0, 0.0, 1.0, 1.0],
            }
        )
    # similarities with many exact ties (few distinct levels), ranked with the documented tie-break
    levels = draw(st.integers(1, 5))
    sim = rng.integers(0, levels, size=(nq, ndb)).astype(np.float32)
    k = draw(st.integers(1, ndb))
    return sim, gnd, k


@settings(max_examples=150, deadline=None)
@given(_problems())
def test_matches_reference_with_ties_and_truncation(problem) -> None:
    sim, gnd, k = problem
    ranks = rank_by_similarity(sim)
    # ties are broken by the lower database index
    for row_sim, row_rank in zip(sim, ranks):
        s = row_sim[row_rank]
        assert np.all(np.diff(s) <= 0)
        same = np.diff(s) == 0
        assert np.all(np.diff(row_rank)[same] > 0)
    ndb = sim.shape[1]
    _assert_close(evaluate_revisited(ranks, gnd).as_dict(), _reference(ranks, gnd))
    truncated = evaluate_revisited(ranks[:, :k], gnd, n_database=ndb)
    assert truncated.truncated == (k < ndb)
    _assert_close(truncated.as_dict(), _reference(ranks[:, :k], gnd))


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_overlapping_lists_follow_official_semantics(seed) -> None:
    # Lists that overlap (not the case in the real files) still agree with the reference logic.
    rng = np.random.default_rng(seed)
    ndb, nq = 15, 3
    ranks = np.stack([rng.permutation(ndb) for _ in range(nq)])
    gnd = [
        {k: rng.choice(ndb, size=4, replace=False).tolist() for k in ("easy", "hard", "junk")}
        for _ in range(nq)
    ]
    _assert_close(evaluate_revisited(ranks, gnd).as_dict(), _reference(ranks, gnd))


@settings(max_examples=100, deadline=None)
@given(_problems(), st.booleans(), st.sampled_from([np.float32, np.float64, np.float16]))
def test_from_similarity_equals_ranking_then_scoring(problem, overlapping: bool, dtype) -> None:
    # many exact ties (few levels), -0.0 next to 0.0, optionally lists that overlap, every float width
    sim, gnd, _ = problem
    sim = (sim - sim.mean()).astype(dtype)
    sim[sim == 0] = np.where(np.arange((sim == 0).sum()) % 2, -0.0, 0.0)
    if overlapping:
        gnd = [dict(g, junk=list(g["junk"]) + list(g["easy"][:1])) for g in gnd]
    expected = evaluate_revisited(rank_by_similarity(sim), gnd)
    got = evaluate_revisited_from_similarity(sim, gnd)
    _assert_close(got.as_dict(), expected.as_dict())
    for s in "EMH":
        np.testing.assert_allclose(got.aps[s], expected.aps[s], atol=1e-12)
    assert got.truncated is False


def test_from_similarity_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="NaN"):
        evaluate_revisited_from_similarity(np.array([[np.nan, 1.0]]), [{"easy": [0], "hard": [], "junk": []}])
    for bad in (np.inf, -np.inf):  # in the middle of a row and at either end
        for row in ([0.5, bad, 0.2], [bad, 0.1, 0.2], [0.3, 0.1, bad]):
            with pytest.raises(ValueError, match="NaN or infinite"):
                evaluate_revisited_from_similarity(
                    np.array([[0.0, 0.0, 0.0], row]), [{"easy": [0], "hard": [], "junk": []}] * 2
                )
    with pytest.raises(ValueError, match="2-D float"):
        evaluate_revisited_from_similarity(np.array([[1, 2]]), [{"easy": [0], "hard": [], "junk": []}])


def test_from_similarity_signed_zero_ties() -> None:
    sim = np.array([[0.0, -0.0, 0.5, -0.0]], dtype=np.float32)  # stable order: 2, 0, 1, 3
    gnd = [{"easy": [1], "hard": [3], "junk": []}]
    assert rank_by_similarity(sim)[0].tolist() == [2, 0, 1, 3]
    _assert_close(
        evaluate_revisited_from_similarity(sim, gnd).as_dict(),
        evaluate_revisited(np.array([[2, 0, 1, 3]]), gnd).as_dict(),
    )
