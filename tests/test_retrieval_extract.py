"""src/extract.py: a folder of images -> feature store; resumes; skips and lists unreadable files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from PIL import Image

from dalg.retrieval.features import FeatureWriter, load_features
from tests.conftest import CONF, REPO
from tests.test_retrieval_eval import tiny_ckpt  # noqa: F401  (fixture)


def _extract_module():
    spec = importlib.util.spec_from_file_location("dalg_extract_entry", REPO / "src" / "extract.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _images(root: Path) -> list[str]:
    rng = np.random.default_rng(0)
    names = []
    for i, (w, h) in enumerate([(40, 30), (40, 30), (30, 40), (40, 30), (32, 32)]):
        name = f"{'sub/' if i % 2 else ''}img{i}.jpg"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / name)
        names.append(name)
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    return sorted(names)


def _cfg(overrides: list[str], out: Path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="extract", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


def test_extract_folder_resume_and_skip(tiny_ckpt, tmp_path) -> None:  # noqa: F811
    ex = _extract_module()
    names = _images(tmp_path / "imgs")
    over = [
        f"ckpt_path={tiny_ckpt}",
        f"images={tmp_path / 'imgs'}",
        f"output={tmp_path / 'feats'}",
        "test_size=48",
        "batch_size=2",
        "num_workers=0",
        "accelerator=cpu",
        "dtype=float32",
        "shard_size=2",
    ]
    # an earlier, interrupted run left one shard with img0 (marker rows: resume must keep them, not redo them)
    marker = np.full((1, 512), 0.5, np.float32)
    w = FeatureWriter(tmp_path / "feats", dim=512, dtype="float32", shard_size=1)
    w.add(marker, ["img0.jpg"])
    out = ex.extract(_cfg(over, tmp_path))
    store = load_features(out)
    assert store.names == names  # folder order, broken file left out
    np.testing.assert_array_equal(store.features[names.index("img0.jpg")], marker[0])
    others = np.asarray(store.features[[i for i, n in enumerate(names) if n != "img0.jpg"]])
    np.testing.assert_allclose(np.linalg.norm(others, axis=1), 1.0, atol=1e-5)
    assert "broken.jpg" in (tmp_path / "feats.skipped.txt").read_text()
    assert store.meta["test_size"] == 48 and store.meta["scales"] == [1.0]
    assert not (tmp_path / "feats.partial").exists()

    # same image -> same descriptor as a fresh single-image extraction from a list file
    (tmp_path / "list.txt").write_text("sub/img1.jpg\n")
    over2 = [o for o in over if not o.startswith(("images=", "output="))]
    out2 = ex.extract(
        _cfg(
            over2
            + [
                f"images={tmp_path / 'list.txt'}",
                f"image_root={tmp_path / 'imgs'}",
                f"output={tmp_path / 'one'}",
            ],
            tmp_path,
        )
    )
    np.testing.assert_allclose(
        load_features(out2).features[0], store.features[names.index("sub/img1.jpg")], atol=1e-5
    )


def test_extract_refuses_unreadable_when_asked(tiny_ckpt, tmp_path) -> None:  # noqa: F811
    ex = _extract_module()
    _images(tmp_path / "imgs")
    over = [
        f"ckpt_path={tiny_ckpt}",
        f"images={tmp_path / 'imgs'}",
        f"output={tmp_path / 'f'}",
        "skip_unreadable=false",
        "num_workers=0",
        "accelerator=cpu",
    ]
    with pytest.raises(Exception, match="broken.jpg"):
        ex.extract(_cfg(over, tmp_path))
