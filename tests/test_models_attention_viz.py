"""Attention PNG: from a config (random init) and from a Lightning-style checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from dalg.models.attention_viz import attention_maps, main, model_from_checkpoint, model_from_config


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
            "dalg_tiny_heuristic",
            "--size",
            "96",
            "--out",
            str(tmp_path / "viz" / "a.png"),
        ]
    )
    img = Image.open(out)
    assert img.format == "PNG" and img.width > img.height > 0


def test_checkpoint_rebuilds_trained_weights(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from dalg.models.summary import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="model/dalg_tiny")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    torch.manual_seed(5)
    net = model_from_config("dalg_tiny")
    ckpt = {
        "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
        "hyper_parameters": {"model_cfg": model_cfg, "num_classes": 0},
    }
    path = tmp_path / "run.ckpt"
    torch.save(ckpt, path)
    loaded = model_from_checkpoint(path)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
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
