"""The benchmark runner (`make bench`): a --quick smoke run, and the metric reference it times against."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_eval  # noqa: E402

from dalg.retrieval.metrics import evaluate_revisited  # noqa: E402


def test_quick_run_writes_json_and_table(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--quick", "--skip-1m",
                           "--synthetic-images", "--out", str(out)], capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("extraction", "train", "eval", "environment"):
        assert (out / f"{name}.json").is_file(), name
    ex = json.loads((out / "extraction.json").read_text())
    tags = {r["tag"] for r in ex["variants"]}
    assert tags == {"dalg_tiny@1", "dolg_tiny@5", "dolg_tiny@1"}
    for r in ex["variants"]:
        assert r["images_per_s"] > 0 and r["gflops_per_image"] > 0 and r["fraction_of_matmul_peak"] > 0
        assert r["min_cosine_to_plain"] > 0.98  # every optimised variant gives the plain descriptors
    five = next(r for r in ex["variants"] if r["tag"] == "dolg_tiny@5")
    one = next(r for r in ex["variants"] if r["tag"] == "dolg_tiny@1")
    assert five["gflops_per_image"] > 2.5 * one["gflops_per_image"]  # the pyramid is counted (~3.9x)
    s = ex["summary"]["plain"]
    assert s["ratio_dalg_over_dolg5"] == pytest.approx(s["dalg_images_per_s"] / s["dolg5_images_per_s"])
    env = json.loads((out / "environment.json").read_text())
    assert len(env["load_start"]) == 3 and len(env["load_end"]) == 3
    ev = json.loads((out / "eval.json").read_text())
    assert ev["same_scores"] and ev["n_queries"] == 70 and ev["n_database"] == 5000
    table = (out / "results.md").read_text()
    assert "DALG / DOLG-5-scale" in table and "images/s" in table and "matmul" in table


def _ties_problem(seed: int):
    sim, gnd = bench_eval.make_problem(12, 300, seed=seed)
    sim = np.round(sim * 10) / 10  # many equal scores: ties must rank by lower index
    gnd[1]["junk"] = gnd[1]["junk"] + gnd[1]["easy"][:1]  # an image listed as easy and junk (official: both)
    gnd[2] = {"easy": [], "hard": [], "junk": [5]}  # no positive: skipped in every setup
    return sim, gnd


@pytest.mark.parametrize("seed", [0, 1])
def test_reference_prototype_and_library_agree_with_ties(seed):
    sim, gnd = _ties_problem(seed)
    ref = bench_eval.reference_scores(sim, gnd)
    fast = bench_eval.fast_scores(sim, gnd)
    proto = bench_eval.prototype_scores(sim, gnd)
    for k in ref:
        assert fast[k] == pytest.approx(ref[k], abs=1e-9), k
        assert proto[k] == pytest.approx(ref[k], abs=1e-9), k


def test_reference_by_hand():
    # protocol.md: positives at ranks 0 and 2 give AP 0.7917 (trapezoid); a junk image ranked first is removed
    sim = np.array([[0.9, 0.8, 0.7, 0.6]])
    gnd = [{"easy": [0, 2], "hard": [], "junk": []}]
    assert bench_eval.reference_scores(sim, gnd)["mAP_E"] == pytest.approx(79.1667, abs=1e-3)
    gnd = [{"easy": [1, 3], "hard": [], "junk": [0]}]
    assert bench_eval.reference_scores(sim, gnd)["mAP_E"] == pytest.approx(79.1667, abs=1e-3)
    ranks = np.argsort(-sim, axis=1)
    assert evaluate_revisited(ranks, gnd).map["E"] == pytest.approx(79.1667, abs=1e-3)


def test_labelled_positions_tie_break_by_index():
    sim = np.array([[0.5, 0.9, 0.5, 0.1, 0.5]])
    gnd = [{"easy": [4], "hard": [2], "junk": [0]}]
    q, pos, bits = bench_eval.labelled_positions(sim, gnd)
    # full ranking: 1 (0.9), 0, 2, 4 (0.5 ties by index), 3
    assert dict(zip(pos.tolist(), bits.tolist())) == {1: 4, 2: 2, 3: 1}
