"""Input normalisation: every backbone config gets timm's data config (mean, std, interpolation) in every
transform, the values travel with checkpoints, and older checkpoints fall back to what they were trained with."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import hydra
import numpy as np
import pytest
import pytorch_lightning as pl
import timm
import torch
from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from PIL import Image
from torchvision import transforms as T

from dalg.data.datamodules import RetrievalDataModule
from dalg.data.images import load_rgb
from dalg.data.transforms import eval_transform, holdout_transform, train_transform
from dalg.lit.module import RetrievalModule
from dalg.tools.model_table import main as model_table
from dalg.utils.input_config import IMAGENET_MEAN, IMAGENET_STD, InputConfig
from tests.conftest import CONF, TINY_SYNTHETIC, compose_config, compose_train

BACKBONES = sorted(p.stem for p in (CONF / "model" / "backbone").glob("*.yaml"))
PIL_RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def _backbone(name: str, overrides: list[str] | None = None):
    # the input config comes from timm's record whether or not the weights are loaded (none offline)
    cfg = compose_config(f"model/backbone/{name}", ["model.backbone.pretrained=false"] + (overrides or []))
    with torch.device("meta"):  # nothing allocated: ViT-B and ResNet-101 build in a blink
        return hydra.utils.instantiate(cfg.model.backbone), cfg.model.backbone


def _ops(transform) -> dict[type, object]:
    return {type(op): op for op in transform.transforms}


def test_every_backbone_config_gets_timms_data_config_in_every_transform() -> None:
    assert {"vit_small", "resnet50", "deit_small", "vit_cpu_tiny"} <= set(BACKBONES)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (61, 97, 3), dtype=np.uint8))
    for name in BACKBONES:
        backbone, cfg = _backbone(name)
        timm_cfg = timm.get_pretrained_cfg(cfg.name).to_dict()  # timm's own record, not our resolver
        config = backbone.input_config
        assert config.mean == pytest.approx(timm_cfg["mean"]) and config.std == pytest.approx(
            timm_cfg["std"]
        ), name
        assert config.interpolation == timm_cfg["interpolation"], name
        assert config.size_multiple == (16 if "vit" in name or "deit" in name else 1), name

        for tf in (train_transform(64, input_config=config), holdout_transform(64, config)):
            # training crops are normalised on the device (DeviceAugment), the hold-out's in the worker
            norm = tf.device_augment or _ops(tf)[T.Normalize]
            assert tuple(norm.mean) == pytest.approx(timm_cfg["mean"]) and tuple(norm.std) == pytest.approx(
                timm_cfg["std"]
            ), name
            resize = next(op for op in tf.transforms if isinstance(op, (T.RandomResizedCrop, T.Resize)))
            assert resize.interpolation.value == timm_cfg["interpolation"], name

        # the eval transform's output is PIL's resize with timm's interpolation, normalised with timm's mean/std
        got = eval_transform(48, config)(img)
        h, w = got.shape[1:]
        ref = np.asarray(img.resize((w, h), PIL_RESAMPLING[timm_cfg["interpolation"]], reducing_gap=None))
        ref = (
            torch.from_numpy(ref).permute(2, 0, 1).float() / 255
            - torch.tensor(timm_cfg["mean"])[:, None, None]
        ) / torch.tensor(timm_cfg["std"])[:, None, None]
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0, msg=name)


def test_the_paper_vits_expect_half_and_override_wins() -> None:
    vit, _ = _backbone("vit_small")
    assert vit.input_config.mean == (0.5, 0.5, 0.5) and vit.input_config.std == (0.5, 0.5, 0.5)
    own, _ = _backbone(
        "vit_small",
        [
            "model.backbone.mean=[0.1,0.2,0.3]",
            "model.backbone.std=0.25",
            "model.backbone.interpolation=bilinear",
        ],
    )
    assert own.input_config.mean == (0.1, 0.2, 0.3) and own.input_config.std == (0.25, 0.25, 0.25)
    assert own.input_config.interpolation == "bilinear" and "model.backbone" in own.input_config.source
    with pytest.raises(InstantiationException, match="input std must be three finite numbers > 0"):
        _backbone("vit_small", ["model.backbone.std=[0.5,0,0.5]"])
    with pytest.raises(InstantiationException, match="interpolation must be one of"):
        _backbone("vit_small", ["model.backbone.interpolation=cubic"])


def test_datamodule_hands_the_models_config_to_every_transform(tiny_synthetic: Path) -> None:
    dm = RetrievalDataModule(
        root=str(tiny_synthetic),
        train_size=32,
        batch_size=4,
        num_workers=0,
        val_fraction=0.25,
        eval_sets={
            "h": {
                "_target_": "dalg.data.revisited.RevisitedSet",
                "data_dir": str(tiny_synthetic / "heldout"),
                "gnd_name": "synthetic-heldout",
                "test_size": 40,
            }
        },
    )
    dm.setup(
        "fit"
    )  # as train_pipeline: the data first (the model needs num_classes), then the model's config
    config = InputConfig((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 16)
    dm.set_input_config(config)
    for tf in (dm.train_set.transform, dm.val_set.transform, dm.eval_sets[0].dataset.transform):
        assert tf.input_config == config
    x, _ = dm.eval_sets[0].dataset[0]
    assert x.shape[1] % 16 == 0 and x.shape[2] % 16 == 0
    assert dm.eval_sizes(dm.eval_sets[0])[0] == tuple(x.shape[1:])  # the size buckets follow the multiple


@pytest.mark.parametrize(
    "config", [InputConfig(), InputConfig((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 16)]
)
def test_transparent_pixels_normalise_to_zero_whatever_the_mean(tmp_path: Path, config: InputConfig) -> None:
    path = tmp_path / "clear.png"
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(path)
    tf = eval_transform(32, config)
    x = tf(load_rgb(path, tf.fill_rgb))
    assert x.abs().max() < 1 / 255 / min(config.std)  # within one 8-bit step of 0


def _checkpoint(tmp_path: Path, overrides: list[str]) -> tuple[Path, RetrievalModule]:
    from dalg.train_pipeline import build_module

    module = build_module(compose_train(["model=dalg_tiny"] + overrides, tmp_path), num_classes=3)
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, accelerator="cpu", enable_model_summary=False
    )
    trainer.strategy.connect(module)  # Lightning's own checkpoint writer
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    return tmp_path / "m.ckpt", module


def test_checkpoint_round_trip_keeps_the_input_config(tmp_path: Path) -> None:
    path, trained = _checkpoint(
        tmp_path, ["model.backbone.mean=[0.3,0.4,0.5]", "model.backbone.std=[0.2,0.2,0.3]"]
    )
    stored = torch.load(path, map_location="cpu", weights_only=True)["hyper_parameters"]["input_config"]
    assert stored["mean"] == [0.3, 0.4, 0.5] and stored["size_multiple"] == 16
    loaded = RetrievalModule.for_evaluation(path)
    assert (
        loaded.input_config
        == trained.input_config
        == InputConfig((0.3, 0.4, 0.5), (0.2, 0.2, 0.3), "bicubic", 16)
    )
    assert (
        RetrievalModule.load_from_checkpoint(path, map_location="cpu", weights_only=True).input_config
        == trained.input_config
    )


def test_an_older_checkpoint_keeps_the_imagenet_values_it_was_trained_with(tmp_path: Path, caplog) -> None:
    path, _ = _checkpoint(tmp_path, [])
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    del ckpt["hyper_parameters"]["input_config"]  # as written before input configs were stored
    torch.save(ckpt, tmp_path / "old.ckpt")
    with caplog.at_level("WARNING"):
        old = RetrievalModule.for_evaluation(tmp_path / "old.ckpt")
    assert old.input_config == InputConfig(IMAGENET_MEAN, IMAGENET_STD, "bilinear", 16)
    assert "no stored input config" in caplog.text and "ImageNet" in old.input_config.source
    # resuming training from it under this run's (different) config would mix two normalisations: refused
    fresh, _ = _checkpoint(tmp_path / "b", [])
    module = RetrievalModule.load_from_checkpoint(fresh, map_location="cpu", weights_only=True)
    module._trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"))
    with pytest.raises(ValueError, match=r"model\.backbone\.mean=\[0\.485, 0\.456, 0\.406\]"):
        module.on_load_checkpoint(ckpt)


def test_model_table_prints_each_models_input_mean_and_std(capsys: pytest.CaptureFixture[str]) -> None:
    model_table(["--size", "64", "--models", "dalg_tiny", "dolg_tiny"])
    rows = {
        line.split("|")[1].strip(): line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| d")
    }
    assert "| 0.5, 0.5, 0.5 | 0.5, 0.5, 0.5 |" in rows["dalg_tiny"]
    assert "| 0.485, 0.456, 0.406 | 0.229, 0.224, 0.225 |" in rows["dolg_tiny"]


def test_train_pipeline_normalises_data_as_the_model(
    tiny_synthetic: Path, tmp_path: Path, monkeypatch
) -> None:
    """The data module is built before the model: train() must hand the model's config to it."""
    import dalg.train_pipeline as tp

    seen = {}

    class Stop(Exception):
        pass

    def stop(self, *args, **kwargs):  # the loaders are complete when fit starts: look, then stop
        dm = kwargs["datamodule"]
        seen["train"], seen["eval"] = dm.train_set.transform.input_config, dm.eval_sets[0].dataset.transform
        raise Stop

    monkeypatch.setattr(pl.Trainer, "validate", stop)
    monkeypatch.setattr(pl.Trainer, "fit", stop)
    over = [
        f"data.root={tiny_synthetic}",
        "data.num_workers=0",
        "data.train_size=64",
        "logger=csv",
        "data.batch_size=8",
        "data.eval_sets.synthetic_heldout.test_size=64",
        "~data.eval_sets.landmarks_mini",
    ]
    over += [f"data.generator.{k}={v}" for k, v in TINY_SYNTHETIC.items()]
    cfg = compose_train(over, tmp_path)
    with pytest.raises(Stop):
        tp.train(cfg)
    assert seen["train"].mean == (0.5, 0.5, 0.5) and seen["eval"].input_config.size_multiple == 16
    assert OmegaConf.select(cfg, "model.backbone.mean") is None  # from timm, not from the config
