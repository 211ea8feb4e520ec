"""`make gpu-check` (benchmarks/gpu_check.py): refuses without CUDA, and records every sub-check's failure."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from .conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


def test_without_cuda_it_says_why_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    out = tmp_path / "gpu"
    assert gpu_check.main(["--out", str(out)]) == gpu_check.EXIT_NO_CUDA != 0
    err = capsys.readouterr().err
    assert "cannot run" in err and ("no CUDA device" in err or "CPU-only build" in err)
    assert not out.exists()


def test_dry_run_needs_its_own_output_folder():
    with pytest.raises(SystemExit):
        gpu_check.main(["--allow-cpu"])
    with pytest.raises(SystemExit):
        gpu_check.main(["--checks", "train_bf16,nonsense"])


def test_each_failure_is_recorded_and_the_next_check_runs():
    def boom(p):
        raise RuntimeError("CUDA error: device-side assert")

    def wrong(p):
        raise gpu_check.CheckFailed("compiled descriptors differ")

    checks = {"boom": boom, "fine": lambda p: {"value": 1}, "wrong": wrong}
    rows = gpu_check.run_checks(checks, gpu_check.Profile.cpu_dry_run(), budget_s=60, log=lambda s: None)
    assert [r["status"] for r in rows] == ["failed", "ok", "failed"]
    assert rows[0]["error"].startswith("RuntimeError: CUDA error") and "boom" in rows[0]["traceback"]
    assert rows[1]["figures"] == {"value": 1} and rows[1]["error"] is None
    assert rows[2]["error"] == "CheckFailed: compiled descriptors differ"

    def slow(p):
        time.sleep(0.05)
        return {}

    rows = gpu_check.run_checks(
        {"slow": slow, "late": lambda p: {}},
        gpu_check.Profile.cpu_dry_run(),
        budget_s=0.01,
        log=lambda s: None,
    )
    assert [r["status"] for r in rows] == ["ok", "skipped"] and "budget" in rows[1]["error"]


def test_a_hung_check_is_interrupted_and_the_report_grows_after_each_check():
    def hangs(p):
        time.sleep(30)  # stands for a hung NCCL/CUDA call that returns to Python
        return {}

    seen = []
    rows = gpu_check.run_checks(
        {"hangs": hangs, "after": lambda p: {"x": 1}},
        gpu_check.Profile.cpu_dry_run(),
        budget_s=60,
        log=lambda s: None,
        check_timeout_s=0.3,
        on_result=lambda r: seen.append([x["name"] for x in r]),
    )
    assert rows[0]["status"] == "failed" and rows[0]["error"].startswith("CheckTimeout")
    assert rows[0]["seconds"] < 10 and rows[1]["status"] == "ok"
    assert seen == [["hangs"], ["hangs", "after"]]


def test_markdown_marks_a_dry_run_and_every_check():
    report = {
        "started": "t",
        "dry_run": True,
        "total_seconds": 1.0,
        "complete": False,
        "environment": {"device": "cpu", "torch": "x", "cuda": None, "faiss": "y"},
        "checks": [
            {
                "name": "faiss_gpu",
                "status": "failed",
                "seconds": 0.1,
                "figures": {},
                "error": "CheckFailed: a | b",
            },
            {
                "name": "ddp_nccl",
                "status": "ok",
                "seconds": 2.0,
                "figures": {"backend": "gloo", "global_step": 4},
            },
        ],
    }
    md = gpu_check.markdown(report)
    assert (
        "not a GPU result" in md and "Incomplete" in md and "| faiss_gpu | failed |" in md and "a / b" in md
    )
    assert "| ddp_nccl | ok | 2.0 | backend gloo, 4 steps |" in md


@pytest.mark.slow  # ~2-4 min on 2 CPU cores: the checks themselves, with tiny models on the CPU
def test_cpu_dry_run_of_the_checks(tmp_path):
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "gpu_check.py"),
        "--allow-cpu",
        "--out",
        str(tmp_path),
        "--checks",
        "train_bf16,ddp_nccl,faiss_gpu,extraction",
    ]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    report = json.loads((tmp_path / "results.json").read_text())
    status = {r["name"]: r["status"] for r in report["checks"]}
    assert report["dry_run"] is True and report["complete"] is True
    assert "not a GPU result" in (tmp_path / "results.md").read_text()
    # faiss-cpu has no GPU: that check fails (and is recorded) while the others pass
    assert status == {"train_bf16": "ok", "ddp_nccl": "ok", "faiss_gpu": "failed", "extraction": "ok"}, (
        res.stderr
    )
    assert res.returncode == gpu_check.EXIT_FAILED
    figures = {r["name"]: r["figures"] for r in report["checks"]}
    assert figures["ddp_nccl"]["backend"] == "gloo" and figures["ddp_nccl"]["global_step"] > 0
    for row in figures["train_bf16"].values():
        assert row["images_per_s"] > 0 and row["head_weight_max_change"] > 0
    assert {r["model"] for r in figures["extraction"]["rows"]} == {"dalg_tiny", "dolg_tiny"}
