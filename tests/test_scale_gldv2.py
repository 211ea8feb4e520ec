"""`make scale` (benchmarks/scale_gldv2.py) at 100k rows: the GLDv2 data path, its figures and its safety net."""

from __future__ import annotations

import csv
import re
import sys

import pytest

from dalg.data.gldv2 import read_gldv2_csv

from .conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import scale_gldv2  # noqa: E402

SMALL = dict(
    n_images=100_000,
    n_classes=5_145,  # GLDv2-clean's images per class, at 1/16 of its size
    overrides=["data.num_workers=1", "data.batch_size=4", "data.train_size=64"],
    steps=1,
)


def test_generated_list_has_gldv2_clean_format(tmp_path):
    facts = scale_gldv2.write_train_clean(tmp_path, 5_000, 300, seed=1)
    with open(tmp_path / "train_clean.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 300 and list(rows[0]) == ["landmark_id", "images"]
    ids = [i for r in rows for i in r["images"].split()]
    assert len(ids) == len(set(ids)) == 5_000
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)
    assert {i[0] for i in ids} == set("0123456789abcdef")  # the a/b/c folders fan out as GLDv2's do
    groups = read_gldv2_csv(tmp_path / "train_clean.csv")  # the loader's own reader
    assert sum(map(len, groups.values())) == 5_000 and facts["smallest_class"] >= 1
    assert all(0 <= int(lid) < scale_gldv2.GLDV2_LANDMARK_IDS for lid in groups)


def test_scale_run_100k_rows(tmp_path):
    r = scale_gldv2.run(work_dir=tmp_path, **SMALL)
    for key in (
        "n_images",
        "n_classes",
        "setup_seconds",
        "first_batch_seconds",
        "step_seconds",
        "peak_rss_gib",
    ):
        assert key in r, key
    assert r["n_images"] == 100_000 and r["n_classes"] == 5_145
    assert r["head_weight_shape"] == [5_145, 512]  # the margin head spans every class of the list
    assert 0 < r["setup_seconds"] < 60 and 0 < r["first_batch_seconds"] < 60 and 0 < r["step_seconds"] < 120
    assert r["main_peak_rss_gib"] <= r["peak_rss_gib"] < 6 and r["workers_seen"] == 1
    assert r["batch_shape"] == [4, 3, 64, 64] and r["labels_in_range"] and r["unreadable_images"] == 0
    assert all(x == x and 0 < x < 100 for x in r["losses"])  # finite margin-softmax loss
    for rel in r["first_batch_paths"]:  # built by the dataset itself: train/a/b/c/<id>.jpg
        parts = rel.split("/")
        assert parts[0] == "train" and parts[1:4] == list(parts[4][:3]) and parts[4].endswith(".jpg")
    assert r["optimizer"] == "torch.optim.SGD" and r["first_step_lr"] < 1e-3  # the recipe, warming up
    md = scale_gldv2.markdown(r, "cmd")
    assert "| DataModule setup |" in md and "100,000 / 5,145" in md


def test_scale_run_fails_when_an_image_is_unreadable(tmp_path, monkeypatch):
    link = scale_gldv2.link_batches
    removed = []

    def skip_first_image(dataset, batch_sampler, n_batches, pool):
        linked = link(dataset, batch_sampler, n_batches, pool)
        linked[0][0].unlink()  # the first image of the first batch is missing: replaced, counted, refused
        removed.append(linked[0][0])
        return linked

    monkeypatch.setattr(scale_gldv2, "link_batches", skip_first_image)
    with pytest.raises(RuntimeError, match=r"image\(s\) could not be read") as err:
        scale_gldv2.run(work_dir=tmp_path, **{**SMALL, "n_images": 2_000, "n_classes": 100})
    assert removed[0].name in str(err.value)
