"""Bad input found early, with a clear error: query boxes, missing query images, unreadable training files,
oversized images, late config values, distractor stores, output locations and file permissions."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest
from PIL import Image

from dalg.data.datamodules import RetrievalDataModule
from dalg.data.folder import load_query_csv
from dalg.data.images import ImageReadError
from dalg.data.revisited import RevisitedImages, load_ground_truth


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
