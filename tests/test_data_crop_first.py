"""Crop-first reduced JPEG decoding for training (dalg.data.images.load_rgb_for_crop + CropFirstRandomResizedCrop):
the DCT scale follows the drawn crop, EXIF orientation is respected, and the augmented pixels stay within a small,
documented tolerance of decoding the whole image (benchmarks/bench_decode.py measures the same on photo-like JPEGs).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from dalg.data.gldv2 import GLDv2Dataset, image_path
from dalg.data.images import SOURCE_SIZE, load_rgb, load_rgb_for_crop
from dalg.data.transforms import CropFirstRandomResizedCrop, resized_crop_uint8, train_transform

# mean |difference| of the augmented images, in 8-bit levels: DCT-scaled decoding + a shorter resize vs the full
# decode's resize (0.6 levels measured on photo-like 1600x1200 JPEGs)
MEAN_LEVELS = 1.5


def _photo(w: int, h: int, seed: int = 0, amplitude: float = 100, noise: float = 10) -> Image.Image:
    """A photo-like test image: smooth colour waves plus sensor-like noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    waves = ((0.01, 0.004), (0.003, 0.012), (0.007, 0.007))
    base = np.stack([127 + amplitude * np.sin(xx * f + yy * g) for f, g in waves], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, noise, (h, w, 3)), 0, 255).astype(np.uint8))


def test_dct_scale_follows_the_crop(tmp_path) -> None:
    p = tmp_path / "a.jpg"
    _photo(1600, 1200).save(p, quality=90)
    seen = []

    def crop(side):
        return lambda size: seen.append(size) or (side, 512)

    big = load_rgb_for_crop(p, crop(1100))  # 1100 / 2 >= 512: half size
    assert big.size == (800, 600) and big.info[SOURCE_SIZE] == (1600, 1200)
    small = load_rgb_for_crop(p, crop(900))  # 900 / 2 < 512: the whole image
    assert small.size == (1600, 1200) and SOURCE_SIZE not in small.info
    assert load_rgb_for_crop(p, crop(4096)).size == (200, 150)  # 1/8 at most
    assert seen == [(1600, 1200)] * 3
    # no crop: load_rgb's rule with need_side (2x margin on the longer side)
    assert load_rgb_for_crop(p, lambda size: None, need_side=400).size == (800, 600)
    assert load_rgb_for_crop(p, lambda size: None).size == (1600, 1200)


def test_exif_rotated_jpeg_gets_the_upright_size(tmp_path) -> None:
    p = tmp_path / "r.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    _photo(1600, 1200).save(p, quality=90, exif=exif)
    seen = []
    img = load_rgb_for_crop(p, lambda size: seen.append(size) or (1100, 512))
    assert seen == [(1200, 1600)]
    assert img.size == (600, 800) and img.info[SOURCE_SIZE] == (1200, 1600)


def test_planned_crop_matches_the_full_decode_within_tolerance(tmp_path) -> None:
    p = tmp_path / "a.jpg"
    _photo(1600, 1200, seed=3).save(p, quality=90)
    crop = CropFirstRandomResizedCrop(512, scale=(0.08, 1.0), antialias=True)
    full = load_rgb(p)
    reduced = 0
    for seed in range(8):
        torch.manual_seed(seed)
        planned = load_rgb_for_crop(p, crop.plan)
        drawn = crop._plan[1]  # (top, left, h, w) in full-size pixels
        box = crop.box_for(planned)
        out = resized_crop_uint8(planned, box, (512, 512), "bilinear")
        assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 512, 512)
        # the box moves by at most half a decoded pixel from the drawn one
        s = planned.width / 1600
        top, left, h, w = drawn
        assert np.abs(np.array(box) / s - [left, top, left + w, top + h]).max() <= 0.5 / s + 1e-9
        # the same box from the whole image, resized by PIL: DCT scaling + torch's resize stay within tolerance
        ref = full.resize((512, 512), Image.Resampling.BILINEAR, box=tuple(v / s for v in box))
        diff = np.abs(out.permute(1, 2, 0).numpy().astype(np.float32) - np.asarray(ref, dtype=np.float32))
        assert diff.mean() < MEAN_LEVELS
        reduced += planned.size != (1600, 1200)
    assert reduced >= 2  # some crops were large enough to decode at half size


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest", "lanczos"])
def test_unplanned_or_mismatched_images_get_torchvision_crop(interpolation) -> None:
    mode = T.InterpolationMode(interpolation)
    crop = CropFirstRandomResizedCrop(64, interpolation=mode, antialias=True)
    img = _photo(300, 200)
    crop.plan((999, 999))  # a plan for another image is not used
    torch.manual_seed(0)
    a = crop(img)
    assert a.dtype == torch.uint8 and tuple(a.shape) == (3, 64, 64)
    if interpolation in ("bilinear", "bicubic"):  # resized by torch: torchvision's tensor crop, the same box
        torch.manual_seed(0)
        b = T.RandomResizedCrop(64, interpolation=mode, antialias=True)(TF.pil_to_tensor(img))
        # torch's uint8 kernels for HWC and CHW memory round differently by at most one level
        assert (a.int() - b.int()).abs().max() <= 1
    torch.manual_seed(0)  # and within a level of PIL's own resize of that box
    c = TF.pil_to_tensor(T.RandomResizedCrop(64, interpolation=mode, antialias=True)(img))
    assert (a.float() - c.float()).abs().mean() < 1.0


def test_training_dataset_decodes_large_jpegs_for_the_crop(tmp_path, monkeypatch) -> None:
    ids = [f"{i:016x}" for i in range(4)]
    for i, iid in enumerate(ids):
        path = image_path(tmp_path, iid)
        path.parent.mkdir(parents=True, exist_ok=True)
        _photo(1600, 1200, seed=i).save(path, quality=90)
    (tmp_path / "train_clean.csv").write_text("landmark_id,images\n0," + " ".join(ids) + "\n")
    ds = GLDv2Dataset(tmp_path, transform=train_transform(128, scale=(0.5, 1.0)))
    sizes = []
    import dalg.data.labelled as labelled

    real = labelled.load_rgb_for_crop

    def spy(*args, **kwargs):
        img = real(*args, **kwargs)
        sizes.append(img.size)
        return img

    monkeypatch.setattr(labelled, "load_rgb_for_crop", spy)
    for i in range(4):
        x, label = ds[i]
        assert x.shape == (3, 128, 128) and label == 0
    assert len(sizes) == 4 and all(s[0] <= 400 for s in sizes)  # crops >= 800 px: 1/4 or 1/8 for a 128 crop
