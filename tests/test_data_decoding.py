"""Robust decoding: every kind of damage or unusual file has one clear outcome, converted or skipped and reported."""

import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dalg.data.gldv2 import GLDv2Dataset, image_path
from dalg.data.images import ALPHA_BACKGROUND, ImageReadError, image_size, load_rgb
from dalg.data.transforms import eval_transform, train_transform

GOOD, BAD = "a" * 16, "b" * 16


# ------------------------------------------------------------------------------------------- converted
def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)  # stored 40 wide x 20 high: left half red, right half blue
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored left edge becomes the top
    path = tmp_path / "rotated.jpg"
    Image.fromarray(arr).save(path, exif=exif, quality=95)
    img = load_rgb(path)
    assert img.size == (20, 40) and image_size(path) == (20, 40)
    top, bottom = np.asarray(img)[5, 10], np.asarray(img)[35, 10]
    assert top[0] > 200 and top[2] < 60, top  # red on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_grayscale_becomes_three_equal_channels(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(np.full((6, 8), 77, np.uint8), "L").save(path)
    img = load_rgb(path)
    assert img.mode == "RGB" and np.asarray(img)[0, 0].tolist() == [77, 77, 77]


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(path, quality=100)  # pure cyan ink
    assert Image.open(path).mode == "CMYK"
    r, g, b = np.asarray(load_rgb(path))[8, 8].tolist()
    assert r < 30 and g > 225 and b > 225


def test_palette_with_transparency_is_composited_over_the_mean_colour(tmp_path):
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.info["transparency"] = 0
    path = tmp_path / "palette.png"
    img.save(path, transparency=0)
    out = np.asarray(load_rgb(path))
    assert out[0, 0].tolist() == list(ALPHA_BACKGROUND)  # transparent index
    assert out[2, 2].tolist() == [200, 10, 10]  # opaque palette colour kept


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_over_the_mean_colour(tmp_path, mode):
    channels = 4 if mode == "RGBA" else 2
    arr = np.full((4, 6, channels), 90, np.uint8)
    arr[..., -1] = 255
    arr[0, 0, -1] = 0  # fully transparent pixel
    path = tmp_path / f"alpha_{mode}.png"
    Image.fromarray(arr, mode).save(path)
    out = np.asarray(load_rgb(path))
    assert out[0, 0].tolist() == list(ALPHA_BACKGROUND)
    assert out[1, 1].tolist() == [90, 90, 90]


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 32896, 65535]], np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    out = np.asarray(load_rgb(path))[..., 0][0].tolist()
    assert out == [0, 128, 255]  # a plain convert("RGB") clips everything above 255 to white


def test_image_smaller_than_the_crop_is_upsampled(tmp_path):
    path = tmp_path / "tiny.png"
    Image.new("RGB", (7, 5), (10, 200, 30)).save(path)
    img = load_rgb(path)
    assert tuple(train_transform(32, (0.5, 1.0))(img).shape) == (3, 32, 32)
    assert tuple(eval_transform(40)(img).shape) == (3, 29, 40)  # longer side 40, aspect kept


# -------------------------------------------------------------------------------------- skipped + reported
def _png_header_only(path, width: int, height: int) -> None:
    """A PNG whose IHDR declares ``width`` x ``height`` but carries 1 byte of data: nothing big is allocated."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    data = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    idat = b"IDAT" + zlib.compress(b"\x00")
    data += struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat))
    path.write_bytes(data)


def _truncated_jpeg(path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "missing": lambda p: None,
    "empty": lambda p: p.write_bytes(b""),
    "truncated": _truncated_jpeg,
    "too_large": lambda p: _png_header_only(p, 100_000, 100_000),  # 1e10 px > 2 x MAX_IMAGE_PIXELS
    "not_image": lambda p: p.write_text("<html>404 Not Found</html>"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_file_raises_one_clear_error(tmp_path, kind):
    path = tmp_path / "broken.jpg"
    DAMAGE[kind](path)
    with pytest.raises(ImageReadError) as info:
        load_rgb(path)
    assert info.value.kind == kind and info.value.path == str(path) and str(path) in str(info.value)


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_training_image_is_replaced_and_reported_once(tmp_path, kind, caplog):
    for iid in (GOOD, BAD):
        image_path(tmp_path, iid).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 9), (1, 2, 3)).save(image_path(tmp_path, GOOD))
    DAMAGE[kind](image_path(tmp_path, BAD))
    (tmp_path / "train_clean.csv").write_text(f"landmark_id,images\n5,{BAD} {GOOD}\n")
    ds = GLDv2Dataset(tmp_path)
    ds.report_each = False  # as the DataModule runs it: one summary instead of per-file warnings
    img, label = ds[0]  # the damaged one: its class sibling comes back instead
    assert label == 0 and img.size == (12, 9)
    ds[0]
    with caplog.at_level(logging.WARNING):
        summary = ds.report_failures()
    assert list(summary.new_images) == [str(image_path(tmp_path, BAD))] and summary.total_images == 1
    assert "1 unreadable or missing image(s)" in caplog.text and str(image_path(tmp_path, BAD)) in caplog.text
    assert not ds.report_failures()  # reported once: nothing new the second time


def test_decompression_bomb_guard_with_a_lowered_limit(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (30, 30)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # 900 px > 2 x 400: PIL refuses; restored afterwards
    with pytest.raises(ImageReadError) as info:
        load_rgb(path)
    assert info.value.kind == "too_large" and "decompression" in info.value.reason


def test_broken_exif_keeps_the_pixels(tmp_path, monkeypatch):
    path = tmp_path / "badexif.jpg"
    Image.new("RGB", (10, 6), (0, 90, 0)).save(path)

    def broken_exif(img):
        raise SyntaxError("not a TIFF file")  # what some corrupt EXIF blocks make PIL raise

    monkeypatch.setattr("dalg.data.images.ImageOps.exif_transpose", broken_exif)
    img = load_rgb(path)
    assert img.size == (10, 6) and abs(int(np.asarray(img)[3, 5, 1]) - 90) < 5
