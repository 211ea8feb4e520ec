"""Bad input found early, with a clear error: query boxes, missing query images, unreadable training files,
oversized images, late config values, distractor stores, output locations and file permissions."""

from __future__ import annotations

import importlib.util
import logging
import os
import pickle
import stat
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from PIL import Image

from dalg.data.datamodules import RetrievalDataModule
from dalg.data.folder import load_query_csv
from dalg.data.images import ImageReadError
from dalg.data.revisited import RevisitedImages, load_ground_truth
from dalg.lit.checkpoint_io import atomic_torch_save
from dalg.retrieval.features import save_features
from dalg.utils.atomic import write_json_atomic, write_text_atomic
from dalg.utils.writable import OutputNotWritableError
from tests.conftest import CONF, REPO, TINY_SYNTHETIC
from tests.test_retrieval_eval import tiny_ckpt  # noqa: F401  (fixture)


# ------------------------------------------------------------------------------------------- query boxes
def _revisited(root: Path, boxes: list, sizes=((60, 40), (50, 50))) -> Path:
    """Two queries of the given (w, h), with ``boxes``, and three database images."""
    (root / "jpg").mkdir(parents=True, exist_ok=True)
    names = [f"q{i}" for i in range(len(boxes))]
    for n, (w, h) in zip(names, sizes):
        Image.new("RGB", (w, h), (90, 60, 30)).save(root / "jpg" / f"{n}.jpg")
    for i in range(3):
        Image.new("RGB", (30, 30)).save(root / "jpg" / f"d{i}.jpg")
    gnd = [{"bbx": b, "easy": [0], "hard": [], "junk": []} for b in boxes]
    with open(root / "gnd_toy.pkl", "wb") as f:
        pickle.dump({"imlist": ["d0", "d1", "d2"], "qimlist": names, "gnd": gnd}, f)
    return root


@pytest.mark.parametrize("box", [[70, 5, 90, 30], [5, 55, 30, 60], [-30, -20, -1, -1]],
                         ids=["right", "below", "before"])
def test_gnd_box_wholly_outside_the_image_is_an_error_naming_the_query(tmp_path, box):
    root = _revisited(tmp_path, [[5, 5, 20, 20], box])
    gt = load_ground_truth(root, "toy")
    with pytest.raises(ValueError, match=r"gnd_toy\.pkl: query 1 \(q1, .*q1\.jpg\): bbx .* lies outside the 50x50"):
        RevisitedImages(gt, crop_queries=True)
    RevisitedImages(gt, crop_queries=False)  # without cropping the box is not used: no error


def test_box_partly_outside_is_clipped_with_a_warning(tmp_path, caplog):
    root = _revisited(tmp_path, [[-5.0, 10.0, 70.0, 30.0], [5, 5, 20, 20]])
    with caplog.at_level(logging.WARNING):
        ds = RevisitedImages(load_ground_truth(root, "toy"), crop_queries=True)
    assert ds.boxes[0] == [0.0, 10.0, 60.0, 30.0] and ds.boxes[1] == [5.0, 5.0, 20.0, 20.0]
    assert "query 0 (q0" in caplog.text and "clipped to [0.0, 10.0, 60.0, 30.0]" in caplog.text
    assert ds.load(0).size == (60, 20) and ds.source_size(0) == (60, 20)


def test_query_csv_box_outside_the_image_names_the_csv_and_query(tmp_path):
    images = tmp_path / "photos"
    images.mkdir()
    for name in ("q.jpg", "a.jpg", "b.jpg"):
        Image.new("RGB", (40, 30)).save(images / name)
    csv_path = tmp_path / "queries.csv"
    csv_path.write_text("query,positives,bbx\nq.jpg,a.jpg,50 5 60 20\n")
    gt = load_query_csv(images, csv_path)
    with pytest.raises(ValueError, match=r"queries\.csv: query 0 \(q\.jpg.*lies outside the 40x30 image"):
        RevisitedImages(gt, crop_queries=True)


def test_missing_query_image_with_a_box_is_found_at_setup(tmp_path):
    root = _revisited(tmp_path, [[5, 5, 20, 20], [1, 1, 10, 10]])
    (root / "jpg" / "q1.jpg").unlink()
    dm = RetrievalDataModule(eval_sets={"toy": {"data_dir": str(root), "gnd_name": "toy", "test_size": 32,
                                                "required": True}}, num_workers=0)
    with pytest.raises(ImageReadError, match=r"q1\.jpg.*query 1 \(q1.*has a bbx but its image cannot be read: "
                                             r"file does not exist"):
        dm.setup("validate")  # before any dataloader, extraction or worker


# ------------------------------------------------------------------------ eval.py: outputs and distractors
def _eval_entry():
    spec = importlib.util.spec_from_file_location("dalg_eval_entry_checks", REPO / "src" / "eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _eval_cfg(overrides: list[str], out: Path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


def _no_extraction(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("extraction started before the inputs and outputs were checked")

    monkeypatch.setattr(pl.Trainer, "validate", refuse)


@pytest.mark.parametrize("where", ["parent_is_a_file", "is_a_folder", "features_dir_is_a_file"])
def test_eval_checks_every_output_location_before_extraction(tiny_ckpt, tmp_path, monkeypatch, where):  # noqa: F811
    _no_extraction(monkeypatch)
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    output, key = {"parent_is_a_file": (tmp_path / "file" / "r.json", "output_json"),
                   "is_a_folder": (tmp_path / "folder", "output_json"),
                   "features_dir_is_a_file": (tmp_path / "file.json", "save_features")}[where]
    if where == "features_dir_is_a_file":
        (tmp_path / "features").write_text("a file where the feature stores would go")
    cfg = _eval_cfg([f"ckpt_path={tiny_ckpt}", f"output_json={output}", "save_features=true"], tmp_path / "run")
    with pytest.raises(OutputNotWritableError, match=f"{key}=") as err:
        _eval_entry().evaluate(cfg)
    assert str(tmp_path) in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_eval_read_only_output_folder(tiny_ckpt, tmp_path, monkeypatch):  # noqa: F811
    _no_extraction(monkeypatch)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputNotWritableError, match="output_json="):
            _eval_entry().evaluate(_eval_cfg([f"ckpt_path={tiny_ckpt}", f"output_json={ro / 'r.json'}"], tmp_path))
    finally:
        ro.chmod(0o700)


def _store(path: Path, rows: np.ndarray) -> Path:
    save_features(path, rows, [f"d{i}" for i in range(len(rows))], dtype="float32")
    return path.with_suffix(".npy")


@pytest.mark.parametrize("kind, message", [("dim", r"descriptors are 64-d, the model gives 512-d"),
                                           ("norm", r"3 of 300 checked rows are not L2-normalised")])
def test_bad_distractor_store_is_rejected_before_extraction(tiny_ckpt, tiny_synthetic, tmp_path,  # noqa: F811
                                                            monkeypatch, kind, message):
    _no_extraction(monkeypatch)
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((300, 64 if kind == "dim" else 512)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    if kind == "norm":
        rows[[0, 150, 299]] *= 3.0  # a few rows left unnormalised (the first, a middle and the last)
    store = _store(tmp_path / "distractors", rows)
    over = [f"ckpt_path={tiny_ckpt}", "data=synthetic", f"data.root={tiny_synthetic}", "~data.eval_sets.landmarks_mini",
            "test_size=64", "num_workers=0", "accelerator=cpu", f"distractors={store}"]
    over += [f"data.generator.{k}={v}" for k, v in TINY_SYNTHETIC.items()]
    with pytest.raises(ValueError, match=f"distractors={store}: {message}"):
        _eval_entry().evaluate(_eval_cfg(over, tmp_path / "run"))


# ------------------------------------------------------------------------------------- file permissions
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        written = [write_json_atomic({"a": 1}, tmp_path / "run_meta.json"),
                   write_text_atomic("x: 1\n", tmp_path / "config.yaml"),
                   atomic_torch_save({"state_dict": {}}, tmp_path / "checkpoints" / "last.ckpt"),
                   _store(tmp_path / "feats", np.eye(2, dtype=np.float32))]
    finally:
        os.umask(old)
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
