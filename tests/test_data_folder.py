"""A user's own photos: class subfolders for training, a folder + queries CSV for evaluation."""

import logging

import hydra
import pytest
from PIL import Image

from dalg.data.datamodules import RetrievalDataModule
from dalg.data.folder import ImageFolderDataset, QueryCsvSet, list_images, load_query_csv
from dalg.data.revisited import RevisitedSet
from dalg.utils.config_checks import ConfigError


def _img(path, size=(30, 20), colour=(100, 50, 25)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_class_subfolders_become_sorted_labels(tmp_path, caplog):
    _img(tmp_path / "tower" / "a.jpg")
    _img(tmp_path / "tower" / "more" / "b.png")
    _img(tmp_path / "bridge" / "c.JPG")
    (tmp_path / "bridge" / "notes.txt").write_text("not an image")
    _img(tmp_path / "bridge" / ".hidden.jpg")
    (tmp_path / "empty").mkdir()
    _img(tmp_path / "loose.jpg")
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(tmp_path)
    assert ds.label_map == {"bridge": 0, "tower": 1}
    assert ds.samples == [("bridge/c.JPG", 0), ("tower/a.jpg", 1), ("tower/more/b.png", 1)]
    assert ds[2][0].size == (30, 20)
    assert "empty holds no image" in caplog.text and "directly in the root are ignored" in caplog.text


def test_folder_without_classes_is_a_clear_error(tmp_path):
    _img(tmp_path / "only.jpg")
    with pytest.raises(ValueError, match="no class subfolder"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope")


def _eval_folder(root):
    for name in (
        "q_tower.jpg",
        "tower 1.jpg",
        "tower2.jpg",
        "far_tower.jpg",
        "bridge.jpg",
        "sub/q_bridge.png",
        "sub/bridge2.jpg",
    ):
        _img(root / name, size=(40, 30))
    return root


def test_queries_csv_becomes_revisited_ground_truth(tmp_path):
    images = _eval_folder(tmp_path / "photos")
    csv_path = tmp_path / "queries.csv"
    csv_path.write_text(
        "query,positives,junk,bbx\n"
        "q_tower.jpg,tower 1.jpg;tower2,far_tower.jpg,5 5 25 20\n"
        "sub/q_bridge,bridge.jpg sub/bridge2.jpg,,\n"
    )
    gt = load_query_csv(images, csv_path, "mine")
    assert gt.qimlist == ["q_tower.jpg", "sub/q_bridge.png"]
    assert gt.imlist == ["bridge.jpg", "far_tower.jpg", "sub/bridge2.jpg", "tower 1.jpg", "tower2.jpg"]
    assert gt.gnd[0] == {"bbx": [5.0, 5.0, 25.0, 20.0], "easy": [3, 4], "hard": [], "junk": [1]}
    assert gt.gnd[1] == {"bbx": None, "easy": [0, 2], "hard": [], "junk": []}
    assert gt.query_path(1) == images / "sub" / "q_bridge.png" and gt.database_path(3).is_file()


@pytest.mark.parametrize(
    "body, message",
    [
        ("query,positives\nq_tower.jpg,nothere.jpg\n", "line 2: 'nothere.jpg' is not an image"),
        (
            "query,positives\nq_tower.jpg,sub/q_bridge.png\nsub/q_bridge.png,bridge.jpg\n",
            "are queries, not database",
        ),
        ("query,pos\nq_tower.jpg,bridge.jpg\n", "missing column"),
        ("query,positives,junk\nq_tower.jpg,bridge.jpg,bridge.jpg\n", "both positive and junk"),
        ("query,positives,bbx\nq_tower.jpg,bridge.jpg,5 5 2 20\n", "bbx must be"),
    ],
)
def test_queries_csv_errors_name_the_line(tmp_path, body, message):
    images = _eval_folder(tmp_path / "photos")
    (tmp_path / "q.csv").write_text(body)
    with pytest.raises(ValueError, match=message):
        load_query_csv(images, tmp_path / "q.csv")


def test_folder_training_and_csv_evaluation_through_the_datamodule(tmp_path):
    for cls in ("a", "b"):
        for k in range(2):
            _img(tmp_path / "train" / cls / f"{k}.jpg", size=(50, 40))
    images = _eval_folder(tmp_path / "photos")
    (tmp_path / "q.csv").write_text("query,positives,bbx\nq_tower.jpg,tower2.jpg,0 0 20 30\n")
    spec = {
        "_target_": "dalg.data.folder.QueryCsvSet",
        "images": str(images),
        "queries_csv": str(tmp_path / "q.csv"),
        "test_size": 32,
        "required": True,
    }
    dm = RetrievalDataModule(
        root=str(tmp_path / "train"),
        layout="folder",
        verify="header",
        train_size=16,
        batch_size=2,
        num_workers=0,
        eval_sets={"mine": spec},
        eval_batch_size=4,
    )
    dm.setup("fit")
    assert dm.num_classes == 2 and [s.name for s in dm.eval_sets] == ["mine"]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 16, 16)
    eval_set = dm.eval_sets[0]
    assert eval_set.dataset.load(0).size == (20, 30)  # the query is cropped to its bbx
    shapes = {tuple(b[0].shape[2:]) for b in dm.val_dataloader()[0]}
    assert shapes == {(32, 21), (24, 32)}  # cropped query 20x30 -> 21x32 (w x h); 40x30 database -> 32x24


def test_optional_csv_set_with_missing_files_is_skipped(tmp_path):
    dm = RetrievalDataModule(
        eval_sets={
            "mine": {
                "_target_": "dalg.data.folder.QueryCsvSet",
                "images": str(tmp_path / "x"),
                "queries_csv": str(tmp_path / "q.csv"),
                "test_size": 32,
                "required": False,
            }
        }
    )
    dm.setup("validate")
    assert dm.eval_sets == [] and "mine" in dm.skipped_eval_sets


def test_list_images_is_sorted_and_recursive(tmp_path):
    _img(tmp_path / "b.jpg")
    _img(tmp_path / "a" / "c.webp")
    (tmp_path / "a" / "readme.md").write_text("x")
    assert list_images(tmp_path) == ["a/c.webp", "b.jpg"]


def test_run_fingerprint_lists_every_file_that_defines_the_data(tmp_path):
    """run_meta.json's data fingerprint reads the typed specs: a queries CSV counts as a gnd pickle does."""
    from dalg.utils.run_metadata import datamodule_list_files, dataset_fingerprint

    images = _eval_folder(tmp_path / "photos")
    (tmp_path / "q.csv").write_text("query,positives\nq_tower.jpg,tower2.jpg\n")
    dm = RetrievalDataModule(
        root=str(tmp_path / "train"),
        layout="folder",
        eval_sets={
            "mine": QueryCsvSet(images=str(images), queries_csv=str(tmp_path / "q.csv"), test_size=32),
            "ox": RevisitedSet(data_dir=str(tmp_path / "ox"), gnd_name="roxford5k", test_size=32),
        },
    )
    files = datamodule_list_files(dm)
    assert files == {
        "train": None,
        "eval/mine": tmp_path / "q.csv",
        "eval/ox": tmp_path / "ox" / "gnd_roxford5k.pkl",
    }
    before = dataset_fingerprint(files)
    assert before["files"]["eval/mine"]["sha256"] is not None  # the CSV is hashed
    (tmp_path / "q.csv").write_text("query,positives\nq_tower.jpg,tower1.jpg\n")
    assert dataset_fingerprint(files)["sha256"] != before["sha256"]  # another CSV: another fingerprint


def test_documented_command_adds_your_own_evaluation_set_while_training(tmp_path):
    """conf/data/folder.yaml's command: +data/eval@data.eval_sets.mine=query_csv with images and queries_csv."""
    from dalg.utils.config_checks import check_paths
    from tests.conftest import compose_train

    for cls in ("a", "b"):
        _img(tmp_path / "train" / cls / "0.jpg", size=(50, 40))
    images = _eval_folder(tmp_path / "photos")
    (tmp_path / "q.csv").write_text("query,positives\nq_tower.jpg,tower2.jpg\n")
    cfg = compose_train(
        [
            "data=folder",
            f"data.root={tmp_path / 'train'}",
            "+data/eval@data.eval_sets.mine=query_csv",
            f"data.eval_sets.mine.images={images}",
            f"data.eval_sets.mine.queries_csv={tmp_path / 'q.csv'}",
            "data.monitor_set=mine",
        ],
        tmp_path / "out",
    )
    check_paths(cfg)  # the config checks read the spec (this raised ConfigAttributeError: data_dir)
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("validate")
    mine = next(s for s in dm.eval_sets if s.name == "mine")
    assert mine.gt.n_queries == 1 and mine.test_size == 512 and mine.crop_queries  # conf/data/eval/defaults
    (tmp_path / "q.csv").unlink()
    with pytest.raises(ConfigError, match=r"data\.eval_sets\.mine: .*q\.csv not found \(required: true\)"):
        check_paths(cfg)


def test_an_evaluation_set_without_target_is_an_error_naming_it(tmp_path):
    from dalg.utils.config_checks import check_paths
    from tests.conftest import compose_train

    cfg = compose_train(["+data.eval_sets.old={data_dir:/x,gnd_name:y,test_size:64}"], tmp_path / "out")
    with pytest.raises(
        ConfigError, match=r"data\.eval_sets\.old is not an evaluation-set spec: give it a _target_"
    ):
        check_paths(cfg)
    with pytest.raises(
        ValueError, match=r"data\.eval_sets\.old: expected an evaluation-set spec with a _target_"
    ):
        RetrievalDataModule(eval_sets={"old": {"data_dir": "/x", "gnd_name": "y", "test_size": 64}})
