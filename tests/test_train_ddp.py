"""trainer=ddp_cpu: src/train.py with 2 gloo processes for a few steps, retrieval callback included."""

import json
import os
import subprocess
import sys

import pytest
import torch

from .conftest import REPO, tiny_data_overrides


@pytest.mark.slow
def test_two_process_gloo_training_and_retrieval(tiny_synthetic, tmp_path):
    cmd = [
        sys.executable,
        str(REPO / "src" / "train.py"),
        "trainer=ddp_cpu",
        *tiny_data_overrides(tiny_synthetic),
        "~data.eval_sets.landmarks_mini",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "validate_before_fit=false",
        "logger=csv",
        "callbacks.rich_progress_bar=null",
        "trainer.enable_progress_bar=false",
        f"paths.log_dir={tmp_path}",
        "run_name=ddp",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert "MEMBER: 2/2" in log, "Lightning did not start 2 processes"
    run = tmp_path / "train" / "runs" / "ddp"
    final = json.loads((run / "metrics.json").read_text())
    # 2 optimiser steps; each process trained on its own half of every batch-of-batches (the loader shards itself)
    assert final["global_step"] == 2
    for key in ("mAP_E", "mAP_M", "mAP_H"):
        value = final["metrics"][f"val/synthetic_heldout/{key}"]
        assert 0.0 <= value <= 100.0
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    # one set of run files, written by rank 0 only
    assert (run / "run_meta.json").is_file() and not list(run.glob("run_meta.resume*.json"))
