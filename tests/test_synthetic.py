import hashlib

import numpy as np
import pytest
from PIL import Image

from dalg.data.gldv2 import GLDv2Dataset
from dalg.data.revisited import load_ground_truth
from dalg.data.synthetic import HELDOUT_NAME, ensure_synthetic_landmarks
from dalg.utils.safe_pickle import load_plain_pickle

from .conftest import TINY_SYNTHETIC


def _digest(root):
    h = hashlib.sha1()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "SPEC.json":
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_generation_is_deterministic(tmp_path, tiny_synthetic):
    again = ensure_synthetic_landmarks(tmp_path / "again", **TINY_SYNTHETIC)
    assert _digest(again) == _digest(tiny_synthetic)
    other = ensure_synthetic_landmarks(tmp_path / "other", **{**TINY_SYNTHETIC, "seed": 1})
    assert _digest(other) != _digest(tiny_synthetic)


def test_existing_dataset_with_other_settings_is_refused(tiny_synthetic):
    with pytest.raises(FileExistsError, match="other settings"):
        ensure_synthetic_landmarks(tiny_synthetic, **{**TINY_SYNTHETIC, "train_classes": 13})


def test_train_split_is_gldv2_layout(tiny_synthetic):
    ds = GLDv2Dataset(tiny_synthetic, "train_clean.csv")
    assert ds.num_classes == TINY_SYNTHETIC["train_classes"]
    assert len(ds) == TINY_SYNTHETIC["train_classes"] * TINY_SYNTHETIC["images_per_class"]
    image_id = ds.samples[0][0]
    assert len(image_id) == 16 and int(image_id, 16) >= 0
    assert (
        ds.path(0) == tiny_synthetic / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
    )
    # train.csv lists the same images and classes
    assert GLDv2Dataset(tiny_synthetic, "train.csv").samples == ds.samples
    img, label = ds[0]
    assert (
        isinstance(img, Image.Image) and img.mode == "RGB" and max(img.size) == TINY_SYNTHETIC["image_size"]
    )


def test_views_of_one_scene_are_closer_than_views_of_two(tiny_synthetic):
    """The task is learnable: even raw pixels put two views of a scene nearer than two scenes, on average."""
    ds = GLDv2Dataset(tiny_synthetic, "train_clean.csv")

    def vec(i):
        return np.asarray(ds[i][0].resize((16, 16)), np.float32).ravel() / 255

    per = TINY_SYNTHETIC["images_per_class"]
    same = [np.linalg.norm(vec(c * per) - vec(c * per + 1)) for c in range(ds.num_classes)]
    diff = [
        np.linalg.norm(vec(c * per) - vec(((c + 1) % ds.num_classes) * per)) for c in range(ds.num_classes)
    ]
    assert np.mean(same) < np.mean(diff)


def test_heldout_split_is_revisited_layout(tiny_synthetic):
    gt = load_ground_truth(tiny_synthetic / "heldout", HELDOUT_NAME)
    assert gt.n_queries == TINY_SYNTHETIC["heldout_classes"]
    per = TINY_SYNTHETIC["heldout_db_per_class"]
    assert gt.n_database == TINY_SYNTHETIC["heldout_classes"] * per + TINY_SYNTHETIC["heldout_distractors"]
    for q, g in enumerate(gt.gnd):
        own = set(range(q * per, (q + 1) * per))
        assert set(g["easy"]) | set(g["hard"]) | set(g["junk"]) == own
        assert g["easy"] and g["hard"] and g["junk"]
        w, h = Image.open(gt.query_path(q)).size
        x0, y0, x1, y1 = g["bbx"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    gnd = load_plain_pickle(tiny_synthetic / "heldout" / f"gnd_{HELDOUT_NAME}.pkl")
    assert set(gnd) == {"imlist", "qimlist", "gnd"}
