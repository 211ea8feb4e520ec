"""Training JPEGs decoded straight into uint8 pixels (dalg.data.jpeg_pixels): the same pixels as PIL's path, the
same crop, and every file it should not or cannot decode handed to PIL (which reports it as before)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode

import dalg.data.jpeg_pixels as jp
from dalg.data.gldv2 import GLDv2Dataset, image_path
from dalg.data.images import SOURCE_SIZE, ImageReadError, load_rgb_for_crop
from dalg.data.transforms import CropFirstRandomResizedCrop, resized_crop_uint8, train_transform
from tests.test_data_crop_first import _photo as crop_first_photo

pytestmark = pytest.mark.skipif(not jp.available(), reason="simplejpeg is not installed")


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    return crop_first_photo(w, h, seed, amplitude=90, noise=8)


def _crop(side: float, out: int = 128):
    return lambda size: (side, out)


@pytest.mark.parametrize("side, factor", [(100, 1), (300, 2), (600, 4), (5000, 8)])
def test_same_pixels_and_size_as_the_pil_path(tmp_path, side: int, factor: int) -> None:
    p = tmp_path / "a.jpg"
    _photo(1000, 700).save(p, quality=90)
    fast = load_rgb_for_crop(p, _crop(side), pixels=True)
    slow = load_rgb_for_crop(p, _crop(side))
    assert isinstance(fast, jp.DecodedRGB) and isinstance(slow, Image.Image)
    assert fast.size == slow.size == (-(-1000 // factor), -(-700 // factor))
    assert fast.info.get(SOURCE_SIZE) == slow.info.get(SOURCE_SIZE) == (None if factor == 1 else (1000, 700))
    diff = np.abs(fast.pixels.astype(int) - np.asarray(slow).astype(int))
    assert diff.max() <= 1  # both are libjpeg-turbo with the accurate DCT


def test_grey_jpegs_decode_to_rgb(tmp_path) -> None:
    p = tmp_path / "g.jpg"
    _photo(200, 150).convert("L").save(p, quality=90)
    fast = load_rgb_for_crop(p, _crop(100, 64), pixels=True)
    assert isinstance(fast, jp.DecodedRGB) and fast.pixels.shape == (150, 200, 3)
    assert np.abs(fast.pixels.astype(int) - np.asarray(load_rgb_for_crop(p, _crop(100, 64)))).max() <= 1


def _cmyk(path) -> None:
    _photo(120, 90).convert("CMYK").save(path, quality=90)


def _rotated(path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    _photo(120, 90).save(path, quality=90, exif=exif)


def _png(path) -> None:
    _photo(120, 90).save(path.with_suffix(".png"))
    path.write_bytes(path.with_suffix(".png").read_bytes())


@pytest.mark.parametrize("make", [_cmyk, _rotated, _png])
def test_files_this_path_leaves_to_pil(tmp_path, make) -> None:
    p = tmp_path / "x.jpg"
    make(p)
    assert jp.decode_for_crop(p, _crop(60, 32)) is None
    img = load_rgb_for_crop(p, _crop(60, 32), pixels=True)  # PIL: upright, converted
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    if make is _rotated:
        assert img.size == (90, 120)


def test_no_crop_or_too_many_pixels_take_the_pil_path(tmp_path) -> None:
    p = tmp_path / "a.jpg"
    _photo(400, 300).save(p, quality=90)
    assert jp.decode_for_crop(p, lambda size: None) is None
    assert jp.decode_for_crop(p, _crop(200, 64), max_pixels=100_000) is None
    with pytest.raises(ImageReadError) as e:
        load_rgb_for_crop(p, _crop(200, 64), max_pixels=10_000, pixels=True)
    assert e.value.kind == "too_large"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "missing"])
def test_broken_files_are_reported_by_the_pil_path(tmp_path, damage: str) -> None:
    p = tmp_path / "b.jpg"
    _photo(300, 200).save(p, quality=90)
    data = p.read_bytes()
    if damage == "truncated":
        p.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        p.write_bytes(data[:200] + b"\x00" * 5000)
    elif damage == "empty":
        p.write_bytes(b"")
    else:
        p.unlink()
    assert jp.decode_for_crop(p, _crop(100, 64)) is None
    with pytest.raises(ImageReadError) as e:
        load_rgb_for_crop(p, _crop(100, 64), pixels=True)
    assert e.value.kind == {"truncated": "truncated", "empty": "empty", "missing": "missing"}.get(
        damage, e.value.kind
    )


def test_the_crop_of_pixels_equals_the_crop_of_the_same_pil_image() -> None:
    img = _photo(300, 200, seed=4)
    pixels = jp.DecodedRGB(np.asarray(img).copy())
    for interpolation in ("bilinear", "bicubic", "lanczos"):
        crop = CropFirstRandomResizedCrop(48, interpolation=InterpolationMode(interpolation))
        torch.manual_seed(1)
        a = crop(pixels)
        torch.manual_seed(1)
        b = crop(img)
        assert torch.equal(a, b), interpolation
    box = (10, 20, 110, 160)
    assert torch.equal(
        resized_crop_uint8(pixels, box, (32, 32), "bicubic"),
        resized_crop_uint8(img, box, (32, 32), "bicubic"),
    )


def test_training_set_reads_plain_jpegs_as_pixels(tmp_path, monkeypatch) -> None:
    ids = [f"{i:016x}" for i in range(3)]
    for i, iid in enumerate(ids):
        path = image_path(tmp_path, iid)
        path.parent.mkdir(parents=True, exist_ok=True)
        _photo(800, 600, seed=i).save(path, quality=90)
    (tmp_path / "train_clean.csv").write_text("landmark_id,images\n0," + " ".join(ids) + "\n")
    seen = []
    real = jp.decode_for_crop
    monkeypatch.setattr(jp, "decode_for_crop", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    ds = GLDv2Dataset(tmp_path, transform=train_transform(64, scale=(0.5, 1.0)))
    for i in range(3):
        x, _ = ds[i]
        assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 64, 64)
    assert len(seen) == 3 and all(isinstance(d, jp.DecodedRGB) for d in seen)
    assert all(d.width <= 200 for d in seen)  # crops >= 400 px for a 64 px output: decoded at 1/4 or 1/8
    monkeypatch.setattr(jp, "simplejpeg", None)  # without the wheel: the PIL path, same output type
    seen.clear()
    x, _ = ds[0]
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 64, 64) and seen == [None]
