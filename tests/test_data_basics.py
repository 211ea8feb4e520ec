import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from dalg.data.gldv2 import GLDv2Dataset, image_path
from dalg.data.images import ImageReadError
from dalg.data.revisited import RevisitedImages, load_ground_truth
from dalg.data.sampling import SizeBucketBatchSampler
from dalg.data.transforms import eval_transform, resized_shape


def _write_gldv2(root, classes: dict[str, list[str]], broken: tuple[str, ...] = ()):
    rows = []
    for lid, ids in classes.items():
        for i in ids:
            p = image_path(root, i)
            p.parent.mkdir(parents=True, exist_ok=True)
            if i in broken:
                p.write_bytes(b"")  # zero-byte file
            else:
                Image.new("RGB", (20, 10), (int(lid) % 255, 0, 0)).save(p)
        rows.append(f"{lid},{' '.join(ids)}")
    (root / "train_clean.csv").write_text("landmark_id,images\n" + "\n".join(rows) + "\n")


def test_gldv2_relabels_in_numeric_order(tmp_path):
    _write_gldv2(tmp_path, {"10": ["a" * 16], "9": ["b" * 16], "100": ["c" * 16, "d" * 16]})
    ds = GLDv2Dataset(tmp_path)
    assert ds.label_map == {"9": 0, "10": 1, "100": 2}
    assert sorted(label for _, label in ds.samples) == [0, 1, 2, 2]


def test_gldv2_min_images_per_class(tmp_path):
    _write_gldv2(tmp_path, {"1": ["a" * 16], "2": ["b" * 16, "c" * 16]})
    assert GLDv2Dataset(tmp_path, min_images_per_class=2).label_map == {"2": 0}


def test_gldv2_unreadable_image_is_replaced_and_counted(tmp_path, caplog):
    _write_gldv2(tmp_path, {"1": ["a" * 16, "b" * 16], "2": ["c" * 16]}, broken=("a" * 16,))
    ds = GLDv2Dataset(tmp_path)
    img, label = ds[0]
    assert label == 0 and img.size == (20, 10)  # the other image of class 1
    assert list(ds.failures) == [str(image_path(tmp_path, "a" * 16))]
    assert "cannot read image" in caplog.text


def test_gldv2_class_without_readable_image_is_named(tmp_path):
    _write_gldv2(tmp_path, {"7": ["a" * 16], "8": ["b" * 16]}, broken=("a" * 16,))
    with pytest.raises(ImageReadError, match="landmark 7"):
        GLDv2Dataset(tmp_path)[0]


def test_gldv2_missing_csv_names_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_clean.csv"):
        GLDv2Dataset(tmp_path)


def _write_revisited(root, name, gnd, imlist, qimlist, size=(40, 30)):
    (root / "jpg").mkdir(parents=True, exist_ok=True)
    for n in imlist + qimlist:
        Image.new("RGB", size, (50, 100, 150)).save(root / "jpg" / f"{n}.jpg")
    with open(root / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)


def test_revisited_query_is_cropped_to_bbx_before_resizing(tmp_path):
    gnd = [{"bbx": [5.4, 2.0, 25.6, 22.0], "easy": [0], "hard": [], "junk": [1]}]
    _write_revisited(tmp_path, "toy", gnd, ["d0", "d1"], ["q0"])
    gt = load_ground_truth(tmp_path, "toy")
    cropped = RevisitedImages(gt, crop_queries=True)
    assert cropped.load(0).size == (21, 20)  # PIL rounds the box: (5, 2, 26, 22)
    assert cropped.source_size(0) == (21, 20)
    assert RevisitedImages(gt, crop_queries=False).load(0).size == (40, 30)
    assert cropped.load(1).size == (40, 30)  # database images are never cropped
    assert cropped[2][1] == 2


def test_revisited_rejects_one_based_indices(tmp_path):
    gnd = [{"bbx": [0, 0, 1, 1], "easy": [2], "hard": [], "junk": []}]  # 2 is out of range for 2 images
    _write_revisited(tmp_path, "bad", gnd, ["d0", "d1"], ["q0"])
    with pytest.raises(ValueError, match="1-based"):
        load_ground_truth(tmp_path, "bad")


def test_test_transform_keeps_aspect_ratio():
    img = Image.new("RGB", (300, 200))
    x = eval_transform(150)(img)
    assert tuple(x.shape) == (3, 100, 150)
    assert resized_shape(200, 300, 150) == (150, 100)


def test_size_buckets_never_mix_shapes_and_cover_every_index():
    sizes = [(10, 20), (20, 10), (10, 20), (10, 20), (20, 10)]
    batches = list(SizeBucketBatchSampler(sizes, batch_size=2))
    assert sorted(i for b in batches for i in b) == list(range(5))
    for b in batches:
        assert len({sizes[i] for i in b}) == 1 and len(b) <= 2
    # two ranks split the batches without overlap
    r0 = [i for b in SizeBucketBatchSampler(sizes, 2, rank=0, world_size=2) for i in b]
    r1 = [i for b in SizeBucketBatchSampler(sizes, 2, rank=1, world_size=2) for i in b]
    assert sorted(r0 + r1) == list(range(5)) and not set(r0) & set(r1)


def test_train_transform_output_shape():
    from dalg.data.transforms import train_transform

    x = train_transform(32, (0.5, 1.0))(Image.fromarray(np.zeros((50, 70, 3), np.uint8)))
    assert isinstance(x, torch.Tensor) and tuple(x.shape) == (3, 32, 32)
