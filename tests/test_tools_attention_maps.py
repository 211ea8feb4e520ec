"""Attention PNG: from a config (random init) and from a training checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalg.tools.attention_maps import attention_maps, main, model_from_checkpoint, model_from_config
from tests.conftest import compose_train


def _image(path: Path, w: int = 150, h: int = 100) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def test_maps_cover_the_resized_image() -> None:
    model = model_from_config("dalg_tiny")
    maps = attention_maps(model, Image.new("RGB", (150, 100), (120, 30, 200)), size=120)
    assert maps["image"].shape == (
        80,
        128,
        3,
    )  # 120 x 80, each side to the nearest patch multiple (no padding)
    for key in ("spatial attention", "cross-attention (g -> local)"):
        assert maps[key].shape == (80, 128)
        assert maps[key].min() >= 0 and maps[key].max() <= 1


def test_cli_from_config_writes_png(tmp_path: Path) -> None:
    out = main(
        [
            "--image",
            str(_image(tmp_path / "a.jpg")),
            "--model",
            "dolg_tiny",
            "--size",
            "96",
            "--out",
            str(tmp_path / "viz" / "a.png"),
        ]
    )
    img = Image.open(out)
    assert img.format == "PNG" and img.width > img.height > 0


def test_checkpoint_rebuilds_trained_weights(tmp_path: Path) -> None:
    from dalg.train_pipeline import build_module

    torch.manual_seed(5)
    module = build_module(compose_train(["model=dalg_tiny", "model.backbone.mean=0.25"], tmp_path), 3)
    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    loaded = model_from_checkpoint(path)
    for k, v in module.net.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    assert loaded.input_config.mean == (0.25, 0.25, 0.25)  # the normalisation it was trained with
    out = main(
        [
            "--image",
            str(_image(tmp_path / "b.png")),
            "--ckpt",
            str(path),
            "--size",
            "64",
            "--out",
            str(tmp_path / "b_att.png"),
        ]
    )
    assert out.is_file()
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(ValueError, match="bad.ckpt"):
        model_from_checkpoint(bad)
