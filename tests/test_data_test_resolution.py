"""Test resolution and padding: ``test_size: null`` keeps each image's own size (the revisited protocol, DOLG's
release), the per-scale resize rule is configurable (DOLG's: round(side * s), bilinear, no antialias), and a ViT
never sees a padded image on the evaluation path."""

from __future__ import annotations

import importlib.util
import itertools
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from PIL import Image

from dalg.data.datamodules import RetrievalDataModule
from dalg.data.transforms import describe_test_size, eval_transform, parse_test_size, resized_shape
from dalg.models.composer import DALG
from dalg.models.multiscale import ScaleResize
from dalg.tools.model_table import build_model
from dalg.utils.config_checks import ConfigError, check_image_sizes
from tests.conftest import CONF, REPO, compose_train

PHOTO = (1000, 750)  # (width, height): a ROxf-like image, longer side <= 1024


def _photo(size=PHOTO, seed=0) -> Image.Image:
    return Image.fromarray(
        np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    )


def _recording(model: DALG) -> list[tuple[int, int]]:
    seen: list[tuple[int, int]] = []
    model.backbone.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    return seen


def test_test_size_values() -> None:
    assert (
        parse_test_size(None) is None
        and parse_test_size("original") is None
        and parse_test_size("512") == 512
    )
    assert describe_test_size(None) == "original" and describe_test_size(224) == 224
    for bad in (0, -3, "big", 12.5, True):
        with pytest.raises(ValueError, match=r"data\.eval_sets\.x\.test_size=.*null / 'original'"):
            parse_test_size(bad, "data.eval_sets.x.test_size")
    assert resized_shape(1000, 750, None) == (750, 1000)  # own size
    assert resized_shape(1000, 750, None, 16) == (752, 992)  # each side to the nearest patch multiple
    assert resized_shape(200, 300, 150) == (150, 100)
    for w, h in (
        (1000, 750),
        (333, 517),
        (17, 900),
    ):  # the aspect ratio moves by at most half a patch per side
        rh, rw = resized_shape(w, h, 512, 16)
        s = 512 / max(w, h)
        assert rh % 16 == rw % 16 == 0 and abs(rh - h * s) <= 8 and abs(rw - w * s) <= 8


def test_original_size_reaches_dolg_at_its_own_size_and_dolgs_scale_rule() -> None:
    model = build_model("dolg_tiny", device="meta").eval()  # shapes only: nothing is computed
    assert model.scale_resize == ScaleResize("bilinear", antialias=False)  # DOLG's rule, from its config
    x = eval_transform(None, model.input_config)(_photo())
    assert tuple(x.shape) == (3, 750, 1000)
    seen = _recording(model)
    model.extract(x[None].to("meta"), [0.3535, 1.0])
    assert seen == [(265, 354), (750, 1000)]  # round(750 * 0.3535), round(1000 * 0.3535); then the original
    # the rule itself: bilinear, half-pixel centres, no antialiasing, to round(side * s)
    small = torch.rand(1, 3, 75, 100)
    torch.testing.assert_close(
        model.scale_resize(small, 0.3535),
        F.interpolate(small, size=(27, 35), mode="bilinear", align_corners=False, antialias=False),
    )


def test_original_size_reaches_a_vit_at_patch_multiples() -> None:
    model = build_model("dalg_tiny", device="meta").eval()
    x = eval_transform("original", model.input_config)(_photo())
    assert tuple(x.shape) == (3, 752, 992)
    seen = _recording(model)
    model.extract(x[None].to("meta"), [0.3535, 0.7071, 1.0, 1.4142])
    assert seen == [(272, 352), (528, 704), (752, 992), (1056, 1408)]
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in seen)


def test_config_checks_accept_original_and_name_a_bad_test_size(tmp_path: Path) -> None:
    cfg = compose_train(
        [
            "data.eval_sets.synthetic_heldout.test_size=null",
            "data.eval_sets.landmarks_mini.test_size=original",
        ],
        tmp_path,
    )
    check_image_sizes(cfg, 16)
    with open_dict(cfg):
        cfg.data.eval_sets.synthetic_heldout.test_size = "huge"
    with pytest.raises(ConfigError, match=r"data\.eval_sets\.synthetic_heldout\.test_size='huge'"):
        check_image_sizes(cfg, 16)


def test_eval_path_never_pads_so_the_descriptor_does_not_depend_on_padding(tiny_synthetic: Path) -> None:
    torch.manual_seed(0)
    model = build_model("dalg_tiny", device="cpu").eval()
    dm = RetrievalDataModule(
        eval_sets={
            "h": {
                "_target_": "dalg.data.revisited.RevisitedSet",
                "data_dir": str(tiny_synthetic / "heldout"),
                "gnd_name": "synthetic-heldout",
                "test_size": 100,
            }
        },
        num_workers=0,
        eval_batch_size=4,
        input_config=model.input_config,
    )
    dm.setup("validate")
    seen = _recording(model)
    patch_embed = model.backbone.vit.patch_embed
    scales = [0.7071, 1.0, 1.4142]

    def batches():  # three batches keep it quick; test_size 100 is no patch multiple, so each side is rounded
        return itertools.islice(dm.eval_dataloader(dm.eval_sets[0]), 3)

    with torch.no_grad():
        padded_allowed = [model.extract(x, scales) for x, _ in batches()]
        patch_embed.dynamic_img_pad = False  # timm now refuses any size that would need padding
        unpadded = [model.extract(x, scales) for x, _ in batches()]
        for a, b in zip(padded_allowed, unpadded):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert seen and all(h % 16 == 0 and w % 16 == 0 for h, w in seen)
        # without rounding to the multiple (the old transform) the same image would have needed padding
        x = eval_transform(100)(dm.eval_sets[0].dataset.load(0))[None]
        with pytest.raises(AssertionError, match="divisible by patch size"):
            model.extract(x, [1.0])


def _eval_entry():
    spec = importlib.util.spec_from_file_location("dalg_eval_entry_resolution", REPO / "src" / "eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_eval_at_original_size_records_it(tmp_path: Path, monkeypatch) -> None:
    """src/eval.py test_size=original: a 1000x750 database image reaches DOLG at 1000x750 and, at scale 0.3535, at
    354x265 (DOLG's rule); the JSON records the test size, the input config and the resize rule."""
    from dalg.train_pipeline import build_module

    data = tmp_path / "tiny"
    (data / "jpg").mkdir(parents=True)
    sizes = {"q0": (320, 240), "d0": PHOTO, "d1": (240, 320)}
    for i, (name, size) in enumerate(sizes.items()):
        _photo(size, seed=i).save(data / "jpg" / f"{name}.jpg", quality=90)
    gnd = {
        "imlist": ["d0", "d1"],
        "qimlist": ["q0"],
        "gnd": [{"bbx": None, "easy": [0], "hard": [], "junk": [1]}],
    }
    with open(data / "gnd_tiny.pkl", "wb") as f:
        pickle.dump(gnd, f)

    module = build_module(
        compose_train(["model=dolg_tiny", "model.scales=[0.3535,1.0]"], tmp_path), num_classes=3
    )
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, accelerator="cpu", enable_model_summary=False
    )
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "dolg.ckpt")

    seen: list[tuple[int, int]] = []
    forward = DALG.forward
    monkeypatch.setattr(
        DALG, "forward", lambda self, x: (seen.append(tuple(x.shape[-2:])), forward(self, x))[1]
    )
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="eval",
            overrides=[
                f"ckpt_path={tmp_path / 'dolg.ckpt'}",
                "data=revisited",
                "data.name=tiny",
                f"data.root={data}",
                "test_size=original",
                "crop_queries=false",
                "num_workers=0",
                "batch_size=2",
                "trainer.accelerator=cpu",
                f"output_json={tmp_path / 'r.json'}",
            ],
        )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    _eval_entry().evaluate(cfg)
    assert (750, 1000) in seen and (265, 354) in seen and (240, 320) in seen and (85, 113) in seen
    protocol = json.loads((tmp_path / "r.json").read_text())["sets"]["tiny"]["protocol"]
    assert protocol["test_size"] == "original" and protocol["scales"] == [0.3535, 1.0]
    assert protocol["scale_resize"] == {"mode": "bilinear", "antialias": False}
    assert protocol["input"]["mean"] == [0.485, 0.456, 0.406] and protocol["input"]["size_multiple"] == 1
