"""The recipe a command gets: CPU for the embedded default, the GPU recipe for real-size backbones (trainer, optimiser,
pretrained weights, GLDv2's data recipe); offline, a clear failure before any data is read; no silent empty jobs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dalg.train_pipeline import train
from dalg.utils.config_checks import ConfigError, check_training_batches

from .conftest import CONF, REPO, compose_train, tiny_data_overrides

CPU_BACKBONES = {"vit_cpu_tiny", "resnet26"}
BACKBONES = sorted(p.stem for p in (CONF / "model" / "backbone").glob("*.yaml"))
VITS = {"vit_tiny", "vit_small", "vit_base", "deit_small"}
README_SWEEP = [
    "-m",
    "model=dalg_cross",
    "data=gldv2",
    "data.root={root}",
    "model/fusion=cross_attention,orthogonal",
]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def test_the_embedded_default_keeps_the_cpu_recipe():
    cfg = _compose([])
    assert cfg.hydra.runtime.choices["recipe"] == "vit_cpu_tiny"
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.precision) == ("cpu", 1, "32-true")
    assert cfg.optim.optimizer._target_ == "torch.optim.AdamW" and cfg.optim.optimizer.lr == 1e-3
    assert cfg.model.backbone.pretrained is False and cfg.trainer.max_epochs == 6


def test_the_users_gldv2_command_gets_the_gpu_recipe():
    cfg = _compose(["model=dalg_cross", "data=gldv2", "data.root=/data/gldv2"])
    assert cfg.hydra.runtime.choices["trainer"] == "auto" and cfg.hydra.runtime.choices["optim"] == "adamw"
    assert (cfg.trainer.accelerator, cfg.trainer.devices) == ("auto", 1)
    assert cfg.trainer.precision == (
        "bf16-mixed"
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        else "32-true"
    )
    assert cfg.optim.optimizer._target_ == "torch.optim.AdamW" and cfg.optim.layer_decay == 0.75
    assert cfg.optim.no_decay_bias_norm is True
    assert cfg.model.backbone.pretrained is True and cfg.model.backbone.checkpoint is None
    # GLDv2's data recipe (DOLG's loader, one device: the release's total batch)
    assert (cfg.data.train_size, cfg.data.batch_size, list(cfg.data.train_scale)) == (512, 64, [0.08, 1.0])


def test_precision_is_bf16_exactly_on_a_cuda_gpu_with_native_bf16(monkeypatch):
    cfg = _compose(["model=dalg_cross", "data=gldv2"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert cfg.trainer.precision == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert cfg.trainer.precision == "32-true"  # emulated bf16: no
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cfg.trainer.precision == "32-true"


def test_dolg_gets_dolgs_released_optimiser_and_head():
    cfg = _compose(["model=dolg_r50", "data=gldv2"])
    assert (
        cfg.hydra.runtime.choices["trainer"] == "auto" and cfg.hydra.runtime.choices["optim"] == "sgd_cosine"
    )
    opt = cfg.optim
    assert opt.optimizer._target_ == "torch.optim.SGD" and opt.optimizer.nesterov and opt.optimizer.lr == 0.01
    assert opt.weight_decay == 1e-4 and opt.no_decay_bias_norm is False and opt.warmup_epochs == 5
    assert cfg.model.head._target_ == "dalg.models.heads.CurricularFace"
    assert (cfg.model.head.margin, cfg.model.head.scale) == (0.15, 30.0)
    assert cfg.model.backbone.name == "resnet50.tv_in1k" and cfg.model.backbone.pretrained is True
    # ArcFace stays one override away
    assert (
        _compose(["model=dolg_r50", "model/head=arcface"]).model.head._target_ == "dalg.models.heads.ArcFace"
    )


def test_dolg_experiment_matches_the_release():
    cfg = _compose(["experiment=dolg_r50_gldv2"])
    assert cfg.model.head._target_ == "dalg.models.heads.CurricularFace"
    assert cfg.trainer.sync_batchnorm is False and cfg.trainer.max_epochs == 100
    assert cfg.optim.no_decay_bias_norm is False and cfg.data.train_size == 512


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_has_a_recipe(backbone):
    cfg = _compose(["model=dalg_tiny", f"model/backbone={backbone}"])
    choices = cfg.hydra.runtime.choices
    assert choices["recipe"] == backbone
    cpu = backbone in CPU_BACKBONES
    assert cfg.model.backbone.pretrained is (not cpu)
    assert choices["trainer"] == ("cpu" if cpu else "auto")
    assert choices["optim"] == ("adamw_cpu" if cpu else "adamw" if backbone in VITS else "sgd_cosine")


@pytest.mark.parametrize("fusion", ["cross_attention", "orthogonal"])
def test_the_readme_sweep_line_composes_to_the_gpu_recipe(fusion):
    cfg = _compose(["model=dalg_cross", "data=gldv2", "data.root=/data/gldv2", f"model/fusion={fusion}"])
    assert cfg.hydra.runtime.choices["model/fusion"] == fusion
    assert (
        cfg.hydra.runtime.choices["trainer"] == "auto" and cfg.optim.optimizer._target_ == "torch.optim.AdamW"
    )
    assert cfg.model.backbone.pretrained is True


def test_command_line_and_experiments_override_the_recipe():
    cfg = _compose(["model=dalg_cross", "trainer=cpu", "optim=sgd_cosine"])
    assert cfg.trainer.accelerator == "cpu" and cfg.optim.optimizer._target_ == "torch.optim.SGD"
    cfg = _compose(["experiment=dalg_gldv2"])
    assert cfg.hydra.runtime.choices["trainer"] == "ddp" and cfg.optim.optimizer._target_ == "torch.optim.SGD"


def test_a_timm_state_dict_loads_into_a_real_size_config(tmp_path, monkeypatch):
    """model.backbone.checkpoint=<file> alone (pretrained=true is the default) gives a real-size ViT its weights,
    offline (ViT-Ti/16 rather than dalg_cross's ViT-S/16: the same code path, a quarter of the time)."""
    import timm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(1)
    ref = timm.create_model("vit_tiny_patch16_224")  # as timm ships it: classifier and 14x14 grid included
    path = tmp_path / "vit_ti.pth"
    torch.save(ref.state_dict(), path)
    cfg = compose_train(
        ["model=dalg_cross", "model/backbone=vit_tiny", "data=gldv2", f"model.backbone.checkpoint={path}"],
        tmp_path,
    )
    assert cfg.model.backbone.pretrained is True
    model = hydra.utils.instantiate(cfg.model, num_classes=0)
    ours = model.backbone.vit.state_dict()
    for key in ("patch_embed.proj.weight", "blocks.11.mlp.fc2.weight", "norm.bias", "pos_embed"):
        torch.testing.assert_close(ours[key], ref.state_dict()[key], rtol=0, atol=0)


def test_a_checkpoint_of_a_pretrained_run_rebuilds_offline(monkeypatch):
    """Evaluating a trained checkpoint never fetches ImageNet weights: its state dict holds every weight."""
    from dalg.lit.module import RetrievalModule

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _compose(["model=dalg_tiny"])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    trained = RetrievalModule(
        model_cfg=model_cfg, num_classes=3, optimizer={"_target_": "torch.optim.SGD", "lr": 0.1}
    )
    hp = dict(trained.hparams)
    hp["model_cfg"] = {**model_cfg, "backbone": {**model_cfg["backbone"], "pretrained": True}}  # as trained
    ckpt = {"state_dict": trained.state_dict(), "hyper_parameters": hp}
    rebuilt = RetrievalModule.from_checkpoint_dict(ckpt, "run.ckpt")
    torch.testing.assert_close(rebuilt.net.descriptor.weight, trained.net.descriptor.weight, rtol=0, atol=0)


def _gldv2_command(root: Path, log_dir: Path) -> list[str]:
    sweep = [a.format(root=root) for a in README_SWEEP]
    return [
        sys.executable,
        str(REPO / "src" / "train.py"),
        *sweep,
        "data.num_workers=0",
        "logger=csv",
        "callbacks.rich_progress_bar=null",
        "trainer.enable_progress_bar=false",
        f"paths.log_dir={log_dir}",
    ]


def test_readme_sweep_without_weights_fails_before_reading_data(tiny_synthetic, tmp_path):
    """The README's sweep line, run as written on a GLDv2-layout folder, offline and with an empty cache: a clear
    failure naming both ways on, before any data is read, in seconds (no network timeout)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "TORCH_HOME": str(tmp_path / "t"),
        "WANDB_MODE": "offline",
    }
    started = time.monotonic()
    proc = subprocess.run(
        _gldv2_command(tiny_synthetic, tmp_path / "logs"),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    elapsed = time.monotonic() - started
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "model.backbone.checkpoint=<" in out and "model.backbone.pretrained=false" in out, out[-3000:]
    assert "vit_small_patch16_224" in out
    run_files = ("label_map.json", "run_meta.json", "config.yaml", "metrics.json", "metrics.csv", "last.ckpt")
    written = [p for p in (tmp_path / "logs").rglob("*") if p.name in run_files and p.parent.name != ".hydra"]
    assert written == [], written  # Hydra's own .hydra/ files only: none of the run's
    assert elapsed < 120, elapsed


def test_batch_size_larger_than_the_data_fails_naming_both(tiny_synthetic, tmp_path):
    """12 classes x 4 images = 48 training images and data.batch_size=64: not one batch; an error, not exit 0."""
    cfg = compose_train(
        tiny_data_overrides(tiny_synthetic)
        + ["data.batch_size=64", "logger=csv", "validate_before_fit=false"],
        tmp_path,
    )
    with pytest.raises(
        ConfigError,
        match=r"data\.batch_size=64 is larger than the 48 training images.*"
        r"data\.batch_size <= 48",
    ):
        train(cfg)
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_training_batches_per_process():
    check_training_batches(64, 64)  # exactly one batch
    check_training_batches(130, 64, world_size=2)  # 65 each
    with pytest.raises(ConfigError, match=r"over 2 processes \(40 each\).*data\.batch_size <= 40"):
        check_training_batches(80, 64, world_size=2)
    with pytest.raises(ConfigError, match=r"data\.batch_size=8 is larger than the 7 training images"):
        check_training_batches(7, 8)
