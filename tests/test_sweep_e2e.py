"""Issue 14's done-when: a 2-job fusion sweep on the embedded data at a tiny budget gives short job folders, a
summary with best and last mAP per job, and W&B offline runs whose name, group, tags, summary, tables and images
are right (read from the offline run files with tests/wandb_offline.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import CONF, REPO, tiny_data_overrides
from .wandb_offline import read_run

SET = "synthetic_heldout"


@pytest.fixture(scope="module")
def sweep(tiny_synthetic, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("sweep")
    cmd = [
        sys.executable,
        str(REPO / "src" / "train.py"),
        "-m",
        "model/fusion=cross_attention,orthogonal",
        *tiny_data_overrides(tiny_synthetic),
        "~data.eval_sets.landmarks_mini",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "validate_before_fit=false",
        "callbacks.rich_progress_bar=null",
        "trainer.enable_progress_bar=false",
        "callbacks.wandb_media.table_queries=3",
        "callbacks.wandb_media.attention_queries=1",
        "callbacks.wandb_media.top_k=3",
        f"paths.log_dir={log_dir}",
        "run_name=fus",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DATA_DIR": str(log_dir / "wandb_data")}
    proc = subprocess.run(cmd, cwd=log_dir, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return log_dir / "train" / "multiruns" / "fus", proc.stdout


def test_job_folders_are_short_and_safe(sweep):
    root, _ = sweep
    jobs = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert jobs == ["0_fusion-cross_attention", "1_fusion-orthogonal"]
    for name in jobs:
        job = root / name
        assert (job / "config.yaml").is_file() and (job / "checkpoints" / "last.ckpt").is_file()
        meta = json.loads((job / "run_meta.json").read_text())
        assert meta["job"]["varying"] == {"model/fusion": name.split("-", 1)[1]}
        assert f"model/fusion={name.split('-', 1)[1]}" in meta["job"]["overrides"]


def test_eval_takes_a_job_checkpoint_unquoted(sweep):
    from hydra import compose, initialize_config_dir

    root, _ = sweep
    ckpt = root / "0_fusion-cross_attention" / "checkpoints" / "last.ckpt"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="eval", overrides=[f"ckpt_path={ckpt}"]
        )  # what `eval.py ckpt_path=...` parses
    assert cfg.ckpt_path == str(ckpt)


def test_summary_has_best_and_last_per_job(sweep):
    root, stdout = sweep
    assert "sweep summary (2 jobs" in stdout
    for ext in ("md", "csv", "json", "png"):
        assert (root / f"summary.{ext}").is_file(), ext
    summary = json.loads((root / "summary.json").read_text())
    assert summary["varying"] == ["model/fusion"]
    assert [r["model/fusion"] for r in summary["jobs"]] == ["cross_attention", "orthogonal"]
    for row in summary["jobs"]:
        metrics = json.loads((root / row["job"].split("/", 1)[1] / "metrics.json").read_text())
        assert row[f"{SET}/mAP_M/best"] == pytest.approx(metrics["best"]["metrics"][f"val/{SET}/mAP_M"])
        assert row[f"{SET}/mAP_M/last"] == pytest.approx(metrics["last"]["metrics"][f"val/{SET}/mAP_M"])
        assert metrics["best"]["checkpoint"].endswith(".ckpt") and metrics["monitor"] == f"val/{SET}/mAP_M"
    md = (root / "summary.md").read_text()
    assert "| 0_fusion-cross_attention | cross_attention |" in md and f"{SET} mAP_M" in md


def test_wandb_offline_runs(sweep):
    root, _ = sweep
    for job, fusion in (
        ("0_fusion-cross_attention", "cross_attention"),
        ("1_fusion-orthogonal", "orthogonal"),
    ):
        (run_dir,) = (root / job / "wandb").glob("offline-run-*")
        run = read_run(run_dir)
        assert (run.name, run.group, run.tags, run.job_type) == (
            f"fus/{job}",
            "fus",
            [f"model/fusion={fusion}"],
            "train",
        )
        # one copy of the config (ours), not Lightning's flat copy of the module's hparams
        assert {"model", "data", "trainer", "run"} <= set(run.config) and "model_cfg" not in run.config
        assert run.config["run"]["job"]["varying"] == {"model/fusion": fusion}
        m = run.summary[f"val/{SET}/mAP_M"]
        assert set(m) == {"max", "last"} and m["max"] >= m["last"]
        assert run.summary[f"best/val/{SET}/mAP_M"] == pytest.approx(m["max"])
        table = run.summary[f"val/{SET}/per_query"]
        assert table["_type"] == "table-file" and table["nrows"] == 3 and table["ncols"] == 2 + 3 + 3
        # the table's thumbnails: 3 queries x (1 + top 3) images, in the table's artifact
        (art,) = {a.name: a for a in run.artifacts if a.type == "run_table"}.values()
        assert sum(c.path.endswith(".png") for c in art.manifest.contents) == 3 * 4
        attention = run.summary[f"val/{SET}/attention"]
        assert attention["count"] == 1 and "spatial attention" in attention["captions"][0]
        assert all((run_dir / "files" / f).is_file() for f in attention["filenames"])
        # images, table and metrics of the validation in one W&B step
        (row,) = [h for h in run.history if f"val/{SET}/mAP_M" in h]
        assert f"val/{SET}/attention/filenames" in row and f"val/{SET}/per_query/_type" in row
        transcript = (root / job / "train.log").read_text()
        assert "retrieval after epoch 0" in transcript and "mAP" in transcript
