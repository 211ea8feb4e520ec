"""Sweep configs: Optuna maximises the validation mAP_M; the SLURM launcher and DDP configs compose; experiments
encode the dalg.md recipe."""

import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from .conftest import CONF, REPO, tiny_data_overrides


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def test_optuna_config_maximises_validation_map_m():
    cfg = _compose(["hparams_search=optuna_dalg"])
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "maximize"
    assert cfg.optimized_metric == "val/synthetic_heldout/mAP_M"
    assert "optim.optimizer.lr" in cfg.hydra.sweeper.params


def test_slurm_launcher_and_ddp():
    cfg = _compose(["launcher=slurm", "trainer.num_nodes=2"])
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.nodes == 2 and cfg.hydra.launcher.tasks_per_node == cfg.trainer.devices
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.use_distributed_sampler is False


@pytest.mark.parametrize(
    "name, model, scales",
    [("dalg_gldv2", "dalg_cross", [1.0]), ("dolg_r50_gldv2", "dolg_r50", [0.3535, 0.5, 0.7071, 1.0, 1.4142])],
)
def test_gldv2_experiments_encode_the_recipe(name, model, scales):
    cfg = _compose([f"experiment={name}"])
    assert cfg.hydra.runtime.choices["model"] == model
    assert cfg.optim.optimizer._target_ == "torch.optim.SGD" and cfg.optim.optimizer.nesterov
    assert (cfg.optim.optimizer.lr, cfg.optim.optimizer.momentum, cfg.optim.weight_decay) == (0.01, 0.9, 1e-4)
    assert cfg.optim.warmup_epochs == 5 and cfg.trainer.devices == 8 and cfg.trainer.strategy == "ddp"
    assert cfg.data.batch_size * cfg.trainer.devices == 64
    assert (cfg.model.head.margin, cfg.model.head.scale) == (0.15, 30.0)
    assert list(cfg.model.scales) == scales
    assert {"roxford5k", "rparis6k"} <= set(cfg.data.eval_sets)
    # every value of the experiment carries its source
    text = (CONF / "experiment" / f"{name}.yaml").read_text().splitlines()
    body = [
        ln
        for ln in text
        if ln.startswith("  ")
        and ":" in ln
        and not ln.strip().startswith(("#", "-"))
        and not ln.rstrip().endswith(":")
    ]
    missing = [ln for ln in body if "#" not in ln]
    assert not missing, f"values without a source comment: {missing}"


@pytest.mark.slow
def test_optuna_sweep_runs_two_trials(tiny_synthetic, tmp_path):
    cmd = [
        sys.executable,
        str(REPO / "src" / "train.py"),
        "-m",
        "hparams_search=optuna_dalg",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2",
        *tiny_data_overrides(tiny_synthetic),
        "~data.eval_sets.landmarks_mini",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "logger=csv",
        "callbacks.rich_progress_bar=null",
        "trainer.enable_progress_bar=false",
        f"paths.log_dir={tmp_path}",
        "run_name=optuna",
    ]
    res = subprocess.run(
        cmd,
        cwd=REPO,
        env={**os.environ, "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    best = tmp_path / "train" / "multiruns" / "optuna" / "optimization_results.yaml"
    assert best.is_file()
    text = best.read_text()
    assert "best_value" in text and "optim.optimizer.lr" in text
