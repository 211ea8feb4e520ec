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
from dalg.data.folder import ImageFolderDataset, load_query_csv
from dalg.data.images import ImageReadError, load_rgb
from dalg.data.labelled import LabelledImages, UnreadableDataError
from dalg.data.revisited import RevisitedImages, RevisitedSet, load_ground_truth
from dalg.lit.checkpoint_io import atomic_torch_save
from dalg.lit.module import RetrievalModule
from dalg.retrieval.features import FeatureWriter, save_features
from dalg.utils.atomic import write_json_atomic, write_text_atomic
from dalg.utils.config_checks import ConfigError
from dalg.utils.writable import OutputNotWritableError
from tests.conftest import CONF, REPO, TINY_SYNTHETIC, compose_train, tiny_data_overrides
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


@pytest.mark.parametrize(
    "box", [[70, 5, 90, 30], [5, 55, 30, 60], [-30, -20, -1, -1]], ids=["right", "below", "before"]
)
def test_gnd_box_wholly_outside_the_image_is_an_error_naming_the_query(tmp_path, box):
    root = _revisited(tmp_path, [[5, 5, 20, 20], box])
    gt = load_ground_truth(root, "toy")
    with pytest.raises(
        ValueError, match=r"gnd_toy\.pkl: query 1 \(q1, .*q1\.jpg\): bbx .* lies outside the 50x50"
    ):
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
    dm = RetrievalDataModule(
        eval_sets={"toy": RevisitedSet(data_dir=str(root), gnd_name="toy", test_size=32)},
        num_workers=0,
    )
    with pytest.raises(
        ImageReadError,
        match=r"q1\.jpg.*query 1 \(q1.*has a bbx but its image cannot be read: "
        r"file does not exist",
    ):
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
def test_eval_checks_every_output_location_before_extraction(tmp_path, monkeypatch, where):
    _no_extraction(monkeypatch)
    monkeypatch.setattr(
        RetrievalModule, "for_evaluation", _refuse("the checkpoint was read before the outputs")
    )
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    output, key = {
        "parent_is_a_file": (tmp_path / "file" / "r.json", "output_json"),
        "is_a_folder": (tmp_path / "folder", "output_json"),
        "features_dir_is_a_file": (tmp_path / "file.json", "save_features"),
    }[where]
    if where == "features_dir_is_a_file":
        (tmp_path / "features").write_text("a file where the feature stores would go")
    cfg = _eval_cfg(
        [f"ckpt_path={tmp_path / 'any.ckpt'}", f"output_json={output}", "save_features=true"],
        tmp_path / "run",
    )
    with pytest.raises(OutputNotWritableError, match=f"{key}=") as err:
        _eval_entry().evaluate(cfg)
    assert str(tmp_path) in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_eval_read_only_output_folder(tmp_path, monkeypatch):
    _no_extraction(monkeypatch)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputNotWritableError, match="output_json="):
            _eval_entry().evaluate(
                _eval_cfg([f"ckpt_path={tmp_path / 'any.ckpt'}", f"output_json={ro / 'r.json'}"], tmp_path)
            )
    finally:
        ro.chmod(0o700)


def _store(path: Path, rows: np.ndarray) -> Path:
    save_features(path, rows, [f"d{i}" for i in range(len(rows))], dtype="float32")
    return path.with_suffix(".npy")


@pytest.mark.parametrize(
    "kind, message",
    [
        ("dim", r"descriptors are 64-d, the model gives 512-d"),
        ("norm", r"3 of 300 checked rows are not L2-normalised"),
    ],
)
def test_bad_distractor_store_is_rejected_before_extraction(
    tiny_ckpt,  # noqa: F811
    tiny_synthetic,
    tmp_path,
    monkeypatch,
    kind,
    message,
):
    _no_extraction(monkeypatch)
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((300, 64 if kind == "dim" else 512)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    if kind == "norm":
        rows[[0, 150, 299]] *= 3.0  # a few rows left unnormalised (the first, a middle and the last)
    store = _store(tmp_path / "distractors", rows)
    over = [
        f"ckpt_path={tiny_ckpt}",
        "data=synthetic",
        f"data.root={tiny_synthetic}",
        "~data.eval_sets.landmarks_mini",
        "test_size=64",
        "num_workers=0",
        "trainer.accelerator=cpu",
        f"distractors={store}",
    ]
    over += [f"data.generator.{k}={v}" for k, v in TINY_SYNTHETIC.items()]
    with pytest.raises(ValueError, match=f"distractors={store}: {message}"):
        _eval_entry().evaluate(_eval_cfg(over, tmp_path / "run"))


# ------------------------------------------------------------------------------------- file permissions
def _written_by_extraction(tmp_path: Path) -> Path:
    """A store assembled from shards as extract.py writes it."""
    writer = FeatureWriter(tmp_path / "extracted", ["a", "b"], dim=2, dtype="float32", shard_size=1)
    writer.add(np.eye(2, dtype=np.float32), ["a", "b"])
    return writer.finalize()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        written = [
            write_json_atomic({"a": 1}, tmp_path / "run_meta.json"),
            write_text_atomic("x: 1\n", tmp_path / "config.yaml"),
            atomic_torch_save({"state_dict": {}}, tmp_path / "checkpoints" / "last.ckpt"),
            _store(tmp_path / "feats", np.eye(2, dtype=np.float32)),
            _written_by_extraction(tmp_path),
        ]
    finally:
        os.umask(old)
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


# ------------------------------------------------------------------------------ unreadable training images
def _class_folder(root: Path, classes: int = 4, per_class: int = 6) -> Path:
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (16, 12), (10 * c, 20, 30)).save(root / f"c{c}" / f"{i}.jpg")
    return root


@pytest.mark.parametrize("mode", ["exists", "header"])
def test_prescan_reports_each_bad_file_once_as_dropped(tmp_path, caplog, mode):
    root = _class_folder(tmp_path)
    (root / "c0" / "1.jpg").write_bytes(b"")
    (root / "c2" / "3.jpg").unlink()
    for i in range(6):
        (root / "c3" / f"{i}.jpg").write_bytes(b"")  # a whole class
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(root, verify=mode)
    assert len(ds) == 4 * 6 - 1 - 1 - 6 and ds.num_classes == 3
    assert len(caplog.records) == 1  # one summary, not also a warning per file and per class
    assert caplog.text.count(str(root / "c0" / "1.jpg")) == 1 and "left out (no label): c3" in caplog.text
    assert "dropped before training" in caplog.text and "are left out" in caplog.text
    assert "replaced" not in caplog.text


def test_training_stops_when_most_images_are_unreadable(tmp_path):
    root = _class_folder(tmp_path, classes=4, per_class=10)
    for c in range(4):
        for i in range(1, 10):
            (root / f"c{c}" / f"{i}.jpg").write_bytes(b"")  # 90 % unreadable: a half-finished download
    dm = RetrievalDataModule(
        root=str(root),
        layout="folder",
        train_size=16,
        batch_size=4,
        num_workers=0,
        max_unreadable_fraction=0.05,
        unreadable_check_after=20,
    )
    dm.setup("fit")
    with pytest.raises(
        UnreadableDataError,
        match=r"of the 2\d images this loader process tried are unreadable "
        r"\(\d+%\), above data.max_unreadable_fraction=0.05",
    ):
        for _ in dm.train_dataloader():
            pass


def test_a_few_unreadable_images_are_replaced_not_fatal(tmp_path):
    root = _class_folder(tmp_path, classes=4, per_class=10)
    (root / "c1" / "3.jpg").write_bytes(b"")
    dm = RetrievalDataModule(
        root=str(root),
        layout="folder",
        train_size=16,
        batch_size=4,
        num_workers=0,
        max_unreadable_fraction=0.05,
        unreadable_check_after=20,
    )
    dm.setup("fit")
    assert sum(len(labels) for _, labels in dm.train_dataloader()) == 40


# ------------------------------------------------------------------------------------- oversized images
def test_max_pixels_refuses_before_decoding_and_default_is_well_below_pils(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(path)
    with pytest.raises(ImageReadError, match=r"300x200 = 0.1 MP to decode, above the limit") as err:
        load_rgb(path, max_pixels=50_000)
    assert err.value.kind == "too_large"
    assert load_rgb(path, max_pixels=60_000).size == (300, 200)
    for data in ("gldv2", "roxford5k"):  # a training and an evaluation config
        cfg = compose_train([f"data={data}"], tmp_path)
        assert 0 < cfg.data.max_pixels <= Image.MAX_IMAGE_PIXELS / 1.5, data


def test_large_jpeg_decodes_at_reduced_size_when_the_target_is_much_smaller(tmp_path):
    path = tmp_path / "wide.jpg"
    Image.new("RGB", (2000, 1000), (120, 80, 40)).save(path)
    assert load_rgb(path).size == (2000, 1000)
    assert load_rgb(path, need_side=200).size == (500, 250)  # 1/4: still >= 2 x 200 on the longer side
    assert load_rgb(path, need_side=600).size == (2000, 1000)  # 1/2 would leave less than 2 x 600
    # too large at full size, fine once decoded at 1/4
    assert load_rgb(path, max_pixels=200_000, need_side=200).size == (500, 250)
    png = tmp_path / "wide.png"
    Image.new("RGB", (2000, 1000)).save(png)
    assert load_rgb(png, need_side=200).size == (2000, 1000)  # only JPEG has reduced-size decoding


def test_eval_sets_decode_database_images_reduced_and_queries_whole(tmp_path):
    root = _revisited(tmp_path, [[100, 100, 1900, 900]], sizes=[(2000, 1000)])
    Image.new("RGB", (2000, 1000)).save(root / "jpg" / "d0.jpg")
    dm = RetrievalDataModule(
        eval_sets={"toy": RevisitedSet(data_dir=str(root), gnd_name="toy", test_size=128)},
        num_workers=0,
        max_pixels=10_000_000,
    )
    dm.setup("validate")
    ds = dm.eval_sets[0].dataset
    assert ds.load(0).size == (1800, 800)  # the query: cropped from the full-size image
    assert ds.load(1).size == (500, 250)  # d0: decoded at 1/4 (>= 2 x 128), the transform resizes it to 128


# ------------------------------------------------------------------------------- config values, checked first
@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.optimizer.lr=-0.001", r"optim\.optimizer\.lr=-0\.001 must be > 0"),
        ("trainer.max_epochs=abc", r"trainer\.max_epochs='abc' is not a number"),
        ("trainer.max_epochs=2.5", r"trainer\.max_epochs=2\.5 must be an integer"),
        ("data.batch_size=0", r"data\.batch_size=0 must be >= 1"),
        ("data.max_unreadable_fraction=1.5", r"data\.max_unreadable_fraction=1\.5 must be in \[0\.0, 1\.0\]"),
    ],
)
def test_bad_numbers_fail_before_any_data_is_read(tiny_synthetic, tmp_path, monkeypatch, override, message):
    from dalg.train_pipeline import train

    monkeypatch.setattr(RetrievalDataModule, "setup", _refuse("data was read before the config was checked"))
    cfg = compose_train(tiny_data_overrides(tiny_synthetic) + [override], tmp_path)
    with pytest.raises(ConfigError, match=message):
        train(cfg)


def test_patch_size_is_checked_before_the_data_prescan(tmp_path, monkeypatch):
    from dalg.train_pipeline import train

    root = _class_folder(tmp_path / "photos")
    monkeypatch.setattr(LabelledImages, "_prescan", _refuse("the pre-scan ran before the patch-size check"))
    cfg = compose_train(
        [
            "data=folder",
            f"data.root={root}",
            "data.verify=header",
            "data.train_size=100",
            "~data.eval_sets.landmarks_mini",
        ],
        tmp_path / "run",
    )
    with pytest.raises(
        ConfigError, match=r"data\.train_size=100 is not a multiple of the backbone's patch size 16"
    ):
        train(cfg)


def _refuse(message: str):
    def refuse(*args, **kwargs):
        raise AssertionError(message)

    return refuse
