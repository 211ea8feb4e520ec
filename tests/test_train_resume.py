"""Kill a training subprocess mid-epoch (SIGKILL), start the same command again: it resumes from the last
checkpoint (global step continues, data order restored) and ends with the weights of an uninterrupted run."""

import csv
import json
import os
import signal
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch

from .conftest import REPO, tiny_data_overrides

KILL_ENV = "DALG_TEST_KILL_AT_STEP"


class KillAtStep(pl.Callback):
    """SIGKILLs its own process before optimiser step ``$DALG_TEST_KILL_AT_STEP`` (no-op without the variable)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = os.environ.get(KILL_ENV)
        if step is not None and trainer.global_step == int(step):
            os.kill(os.getpid(), signal.SIGKILL)


def _command(root, log_dir, run_name):
    over = tiny_data_overrides(root) + [
        "~data.eval_sets.landmarks_mini",
        "trainer.max_epochs=2",
        "callbacks.last_checkpoint.every_n_train_steps=2",
        "validate_before_fit=false",
        "logger=csv",
        "callbacks.rich_progress_bar=null",
        "trainer.enable_progress_bar=false",
        "callbacks.retrieval_eval.grid_queries=0",
        "trainer.log_every_n_steps=1",
        f"paths.log_dir={log_dir}",
        f"run_name={run_name}",
        "+callbacks.kill._target_=tests.test_train_resume.KillAtStep",
    ]
    return [sys.executable, str(REPO / "src" / "train.py"), *over]


def _run(cmd, kill_at=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    env.pop(KILL_ENV, None)
    if kill_at is not None:
        env[KILL_ENV] = str(kill_at)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_killed_run_resumes_mid_epoch_and_matches_uninterrupted(tiny_synthetic, tmp_path):
    # tiny set: 48 images, batch 8 -> 6 steps per epoch, 12 in all; last.ckpt every 2 steps and after validation
    full = _run(_command(tiny_synthetic, tmp_path, "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    full_dir = tmp_path / "train" / "runs" / "full"
    assert _ckpt(full_dir / "checkpoints" / "last.ckpt")["global_step"] == 12

    cmd = _command(tiny_synthetic, tmp_path, "resumable")
    run_dir = tmp_path / "train" / "runs" / "resumable"
    killed = _run(cmd, kill_at=9)  # dies inside epoch 1 (steps 7..12), after the step-8 checkpoint
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
    ckpt = _ckpt(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 8 and ckpt["epoch"] == 1
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["consumed_batches"] == 2
    assert not list((run_dir / "checkpoints").glob("*.tmp")), "a temporary checkpoint file was left behind"

    # the killed run's lock file is left with its pid, but the kernel released the lock: it does not block
    assert (run_dir / "run.lock").read_text().startswith("pid ")

    resumed = _run(cmd)  # the same command again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert not (run_dir / "run.lock").exists()  # released and removed at the end of the run
    final = json.loads((run_dir / "metrics.json").read_text())
    assert final["global_step"] == 12 and final["resumed_from"].endswith("last.ckpt")
    assert (run_dir / "run_meta.json").is_file() and list(run_dir.glob("run_meta.resume*.json"))

    a = _ckpt(full_dir / "checkpoints" / "last.ckpt")["state_dict"]
    b = _ckpt(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-4, f"resumed weights differ from the uninterrupted run by {worst}"
    # and not trivially: training changed the weights between the resume point and the end
    moved = max(float((ckpt["state_dict"][k].float() - b[k].float()).abs().max()) for k in b)
    assert moved > 1e-3

    # the CSV log continues: rows up to the checkpoint are kept, none repeated, and the losses are the
    # uninterrupted run's
    def losses(d):
        with open(d / "csv" / "metrics.csv") as f:
            return [
                (int(r["step"]), float(r["train/loss_step"]))
                for r in csv.DictReader(f)
                if r.get("train/loss_step")
            ]

    got, want = losses(run_dir), losses(full_dir)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(12))
    assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(got, want)), (got, want)
