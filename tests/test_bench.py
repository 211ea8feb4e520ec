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
import bench_extraction  # noqa: E402
import run_all  # noqa: E402
import torch  # noqa: E402

from dalg.retrieval.metrics import evaluate_revisited  # noqa: E402


@pytest.mark.slow  # ~20-40 s on 2 idle cores: builds the tiny DALG and DOLG and extracts at five scales
def test_quick_run_writes_json_and_table(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "run_all.py"),
            "--quick",
            "--skip-1m",
            "--skip-loader",
            "--synthetic-images",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
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
    # issue 16's items 2 and 3: eager fp32 one image at a time, DALG's per-FLOP efficiency relative to DOLG
    pf, opt = ex["summary"]["per_flop"], ex["summary"]["optimised"]
    assert pf["ratio_dalg_over_dolg5"] == pytest.approx(opt["ratio_dalg_over_dolg5"])
    assert pf["dalg_efficiency_relative_to_dolg"] == pytest.approx(
        opt["ratio_dalg_over_dolg5"] / opt["flop_ratio_dolg5_over_dalg"]
    )
    assert 0 < ex["summary"]["eager_fp32_single"]["dalg_fraction_of_fp32_peak"]
    env = json.loads((out / "environment.json").read_text())
    assert len(env["load_start"]) == 3 and len(env["load_end"]) == 3
    ev = json.loads((out / "eval.json").read_text())
    assert ev["same_scores"] and ev["n_queries"] == 70 and ev["n_database"] == 5000
    table = (out / "results.md").read_text()
    assert "DALG / DOLG-5-scale" in table and "images/s" in table and "matmul" in table
    assert "Evaluation from given similarities" in table and "Training step" in table
    assert "per-FLOP efficiency" in table and "product path" in table
    # --table-only rebuilds the table from the JSONs alone
    (out / "results.md").unlink()
    assert run_all.main(["--table-only", "--out", str(out)]) == 0
    assert (out / "results.md").read_text().count("| dolg_tiny@5 |") == 2


def test_extraction_run_counts_flops_per_scale_and_checks_descriptors():
    images = [torch.randn(3, 40, 32), torch.randn(3, 32, 40)]
    V, Opt = bench_extraction.Variant, bench_extraction.InferenceOptions
    variants = [
        V("dalg_tiny", (1.0,), None, tag="one"),
        V("dalg_tiny", (1.0,), Opt(bf16=False), max_batch=2, tag="one"),
        V("dalg_tiny", (0.5, 1.0), None, tag="two"),
    ]
    res = bench_extraction.run(
        variants, images, rounds=1, device=torch.device("cpu"), matmul_n=64, log=lambda s: None
    )
    rows = {(r["tag"], r["options"]): r for r in res["variants"]}
    plain, opt, two = rows[("one", "plain")], rows[("one", "fp32")], rows[("two", "plain")]
    assert opt["min_cosine_to_plain"] == pytest.approx(1.0, abs=1e-5)
    assert (
        plain["latency_ms_median"] > 0 and opt["latency_ms_median"] is None
    )  # batched: no per-image latency
    assert plain["gflops_per_image"] == pytest.approx(opt["gflops_per_image"])
    assert (
        plain["gflops_per_image"] < two["gflops_per_image"] < 2 * plain["gflops_per_image"]
    )  # + half-size pass
    assert res["matmul_peak_gflops_per_s"]["float32"] > 0
    assert plain["fraction_of_matmul_peak"] == pytest.approx(
        plain["achieved_gflops_per_s"] / res["matmul_peak_gflops_per_s"]["float32"]
    )
    assert bench_extraction.best(res["variants"], "one", optimised=True)["options"] == "fp32"


def test_runner_eval_section_and_table(tmp_path):
    assert run_all.main(["--quick", "--sections", "eval", "--out", str(tmp_path)]) == 0
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["same_scores"] and ev["median_ms"]["reference"] > 0 and ev["load_start"] and ev["load_end"]
    table = (tmp_path / "results.md").read_text()
    assert "per-query NumPy reference" in table and "Extraction" not in table
    with pytest.raises(SystemExit):
        run_all.main(["--sections", "nope", "--out", str(tmp_path)])


def _ties_problem(seed: int):
    sim, gnd = bench_eval.make_problem(12, 300, seed=seed)
    sim = np.round(sim * 10) / 10  # many equal scores: ties must rank by lower index
    gnd[1]["junk"] = gnd[1]["junk"] + gnd[1]["easy"][:1]  # an image listed as easy and junk (official: both)
    gnd[2] = {"easy": [], "hard": [], "junk": [5]}  # no positive: skipped in every setup
    return sim, gnd


@pytest.mark.parametrize("seed", [0, 1])
def test_reference_and_library_agree_with_ties(seed):
    sim, gnd = _ties_problem(seed)
    ref = bench_eval.reference_scores(sim, gnd)
    for got in (bench_eval.fast_scores(sim, gnd), bench_eval.rank_then_score(sim, gnd)):
        for k in ref:
            assert got[k] == pytest.approx(ref[k], abs=1e-9), k


def test_reference_by_hand():
    # protocol.md: positives at ranks 0 and 2 give AP 0.7917 (trapezoid); a junk image ranked first is removed
    sim = np.array([[0.9, 0.8, 0.7, 0.6]])
    gnd = [{"easy": [0, 2], "hard": [], "junk": []}]
    assert bench_eval.reference_scores(sim, gnd)["mAP_E"] == pytest.approx(79.1667, abs=1e-3)
    gnd = [{"easy": [1, 3], "hard": [], "junk": [0]}]
    assert bench_eval.reference_scores(sim, gnd)["mAP_E"] == pytest.approx(79.1667, abs=1e-3)
    ranks = np.argsort(-sim, axis=1)
    assert evaluate_revisited(ranks, gnd).map["E"] == pytest.approx(79.1667, abs=1e-3)


def test_child_peak_memory_is_its_own_not_its_parents():
    # ru_maxrss survives fork + exec on Linux: a benchmark started by a big run_all.py reported run_all's peak
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc (Linux)")
    big = bytearray(1500 * 2**20)
    big[::4096] = b"\x01" * len(big[::4096])  # resident in this (parent) process
    code = "import measure, resource; print(measure.process_peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO / "benchmarks", capture_output=True, text=True, check=True
    )
    own, inherited = (int(x) for x in out.stdout.split())
    del big
    assert inherited > 1500 * 2**20  # the quirk is real here, so the test can tell the two apart
    assert own < 1200 * 2**20  # the child's own peak: python + torch import (~0.5 GiB), under the parent's


@pytest.mark.slow  # ~10 s: writes 20k fp16 distractors, searches, measures the matmul peak for 2 s
def test_search_section_records_gemm_bound_and_exactness(tmp_path):
    assert run_all.main(["--quick", "--sections", "search_1m", "--out", str(tmp_path)]) == 0
    s1 = json.loads((tmp_path / "search_1m.json").read_text())
    assert s1["n_database"] == 25_000 and s1["search_seconds"] > 0 and s1["peak_rss_gib"] > 0
    bound = s1["gemm_bound_seconds"] / s1["search_seconds"]  # search_seconds is rounded to ms
    assert s1["fraction_of_gemm_bound"] == pytest.approx(bound, rel=0.05)
    assert s1["exactness_vs_fp32"]["max_gap"] <= 1e-6 and s1["exactness_vs_fp32"]["places"] == 3 * s1["k"]
    assert "GEMM bound" in (tmp_path / "results.md").read_text()


@pytest.mark.slow  # ~30 s: tiny models at 64/128 px, 2k/8k-row search, 4 small evaluations
def test_scaling_section_writes_curves(tmp_path):
    assert run_all.main(["--quick", "--sections", "scaling", "--out", str(tmp_path)]) == 0
    sc = json.loads((tmp_path / "scaling.json").read_text())
    assert (tmp_path / "scaling.png").stat().st_size > 10_000
    assert [r["n_database"] for r in sc["search"]] == [2_000, 8_000]
    assert all(r["seconds"] > 0 and r["peak_rss_gib"] > 0 for r in sc["search"])
    sides = {(r["model"], r["side"]): r["gflops"] for r in sc["extraction"]}
    assert sides[("dalg_tiny", 128)] > 3 * sides[("dalg_tiny", 64)]  # ~4x the pixels, counted
    assert "Scaling curves" in (tmp_path / "results.md").read_text()


def _store(path: Path, rows: np.ndarray, names: list[str]) -> None:
    from dalg.retrieval.features import save_features

    save_features(path, rows, names, dtype="float32")


def test_bf16_fidelity_compares_stores_row_by_row(tmp_path):
    import bench_bf16_fidelity

    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 16)).astype(np.float32)
    y = x.copy()
    y[3] += 0.05 * rng.standard_normal(16).astype(np.float32)  # one row off: it must be the worst
    names = [f"img{i}.jpg" for i in range(5)]
    for key, rows in (("fp32", x), ("bf16", y)):
        _store(tmp_path / key / "features" / "set_queries", rows, names)
    got = bench_bf16_fidelity.compare_stores(tmp_path / "fp32", tmp_path / "bf16")["set_queries"]
    cos = float(x[3] @ y[3] / np.linalg.norm(x[3]) / np.linalg.norm(y[3]))
    assert got["rows"] == 5 and got["worst_image"] == "img3.jpg"
    assert got["min_cosine"] == pytest.approx(cos, abs=1e-7) and cos < 0.9999
    assert got["store_dtype"] == "float32"

    _store(tmp_path / "bf16" / "features" / "set_queries", y, names[::-1])  # other images: refused
    with pytest.raises(SystemExit, match="different images"):
        bench_bf16_fidelity.compare_stores(tmp_path / "fp32", tmp_path / "bf16")


@pytest.mark.slow  # ~40 s: two src/eval.py runs of a random dalg_tiny on landmarks-mini at 64 px
def test_bf16_fidelity_end_to_end(tmp_path):
    from tests.conftest import LANDMARKS_MINI

    if not LANDMARKS_MINI.is_dir():
        pytest.skip(f"{LANDMARKS_MINI} is absent")
    import bench_search_store

    ckpt = tmp_path / "tiny.ckpt"
    bench_search_store.make_checkpoint(ckpt)
    out = tmp_path / "fidelity.json"
    cmd = [sys.executable, str(REPO / "benchmarks/bench_bf16_fidelity.py"), "--ckpt", str(ckpt)]
    proc = subprocess.run([*cmd, "--test-size", "64", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert set(rec["stores"]) == {"landmarks_mini_queries", "landmarks_mini_database"}
    assert rec["stores"]["landmarks_mini_queries"]["rows"] == 61
    assert 0.99 < rec["min_cosine"] <= 1.0 + 1e-6 and rec["meets_goal"] == (rec["min_cosine"] >= 0.9999)
    assert set(rec["mAP"]) == {"fp32", "bf16"} and "mAP_M" in rec["mAP"]["bf16"]["landmarks_mini"]


def test_every_section_has_a_place_in_the_run_order():
    assert sorted(run_all.RUN_ORDER) == sorted(run_all.SECTIONS)
    assert run_all.RUN_ORDER.index("extraction") > run_all.RUN_ORDER.index("train")  # see RUN_ORDER's comment
