"""Reading images from disk: one function, one error type, so every dataset fails and reports the same way.

``load_rgb`` turns everything PIL can open into an upright 8-bit RGB image: EXIF orientation is applied, grayscale
and CMYK are converted, palette and alpha images are composited over a neutral grey (the model's input mean when
the dataset's transform carries one, see ``fill_for``, so that transparent areas normalise to ~0 instead of to a
white or black block; the ImageNet mean otherwise), and 16-bit images are scaled to 8 bits
instead of clipped. Everything it cannot turn into pixels (missing, empty, truncated, not an image, too many
pixels for PIL's decompression-bomb guard) raises :class:`ImageReadError` with a short ``kind`` for reports.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dalg.data import jpeg_pixels
from dalg.data.jpeg_pixels import DecodedRGB, dct_factor

# the ImageNet mean (input_config.IMAGENET_MEAN) in 8 bits: the fill when no model input config is known
ALPHA_BACKGROUND = (124, 116, 104)

_KINDS = ("missing", "empty", "not_image", "truncated", "too_large", "undecodable")
# img.info key: (width, height) of the upright full-size image when load_rgb decoded it at reduced size
SOURCE_SIZE = jpeg_pixels.SOURCE_SIZE
# a JPEG is decoded at reduced size only when at least this factor times the needed side is left (see _draft)
DRAFT_MARGIN = 2


class ImageReadError(RuntimeError):
    """An image file that is missing or cannot be decoded; the message names the file and the reason.

    ``kind`` is one of ``missing``, ``empty``, ``not_image``, ``truncated``, ``too_large``, ``undecodable``.
    """

    def __init__(self, path: str | os.PathLike, reason: str, kind: str = "undecodable"):
        super().__init__(f"cannot read image {os.fspath(path)!r}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason
        self.kind = kind if kind in _KINDS else "undecodable"

    def __reduce__(self):  # keep path/reason/kind when the error crosses a DataLoader worker boundary
        return type(self), (self.path, self.reason, self.kind)


def _classify(path: str | os.PathLike, error: BaseException) -> ImageReadError:
    if isinstance(error, FileNotFoundError):
        return ImageReadError(path, "file does not exist", "missing")
    if isinstance(error, Image.DecompressionBombError):
        return ImageReadError(path, f"decompression-bomb guard: {error}", "too_large")
    if isinstance(error, UnidentifiedImageError):
        try:
            empty = os.path.getsize(path) == 0
        except OSError:
            empty = False
        if empty:
            return ImageReadError(path, "empty file (0 bytes)", "empty")
        return ImageReadError(path, "not an image PIL can identify", "not_image")
    text = f"{type(error).__name__}: {error}"
    if "truncated" in str(error).lower() or "broken data stream" in str(error).lower():
        return ImageReadError(path, f"truncated file ({text})", "truncated")
    return ImageReadError(path, text, "undecodable")


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float grayscale -> ``L``, scaling the value range instead of clipping it."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        out = arr.astype(np.uint32) >> 8
    elif img.mode == "I":  # PNG 16-bit grayscale opens as "I" with values 0..65535
        out = arr.astype(np.int64).clip(0, 65535) >> 8 if arr.max(initial=0) > 255 else arr.clip(0, 255)
    else:  # "F": floats in 0..1 or 0..255
        scale = 255.0 if float(arr.max(initial=0.0)) <= 1.0 else 1.0
        out = np.nan_to_num(arr * scale).clip(0, 255)
    return Image.fromarray(out.astype(np.uint8), "L")


def fill_for(transform: object) -> tuple[int, int, int]:
    """The colour transparent pixels get before ``transform``: its ``fill_rgb`` (the model's input mean, set by
    dalg.data.transforms), else :data:`ALPHA_BACKGROUND`."""
    return tuple(getattr(transform, "fill_rgb", None) or ALPHA_BACKGROUND)  # type: ignore[return-value]


def to_rgb(img: Image.Image, fill: tuple[int, int, int] = ALPHA_BACKGROUND) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (alpha composited over ``fill``)."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return _to_8bit(img).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, tuple(fill))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")  # L, 1, CMYK (PIL reads Adobe inverted CMYK correctly), YCbCr, ...


def _upright(img: Image.Image) -> Image.Image:
    # a broken EXIF block must not cost the pixels: keep the image as stored
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - any EXIF parsing failure; the image itself decoded fine
        return img


def _draft(img: Image.Image, factor: int) -> None:
    """Let libjpeg decode at 1/``factor`` size (DCT scaling, PIL ``draft``): fewer pixels to inverse-transform,
    convert and resize, and a 13000 x 13000 photo costs 1/64 of the memory."""
    if factor > 1:
        img.draft(None, (img.width // factor, img.height // factor))


def load_rgb(
    path: str | os.PathLike,
    fill: tuple[int, int, int] = ALPHA_BACKGROUND,
    max_pixels: int | None = None,
    need_side: float | None = None,
) -> Image.Image:
    """Decode ``path`` into an upright 8-bit RGB image (transparent pixels over ``fill``); raise
    :class:`ImageReadError` if that is impossible.

    ``need_side``: the longer side the caller's transform needs at most; a JPEG whose longer side keeps
    :data:`DRAFT_MARGIN` times that at 1/2, 1/4 or 1/8 is decoded at that reduced size (the transform's own resize
    then still shrinks it, so the result barely changes). ``max_pixels``: an image that would still decode to more
    pixels is refused (kind ``too_large``) before its pixels are read, well below PIL's own guard
    (2 x ``Image.MAX_IMAGE_PIXELS``).
    """
    if not need_side:
        return _load(path, fill, max_pixels, lambda size, orientation: 1)
    return _load(
        path, fill, max_pixels, lambda size, orientation: dct_factor(max(size), DRAFT_MARGIN * need_side)
    )


def load_rgb_for_crop(
    path: str | os.PathLike,
    crop_for: Callable[[tuple[int, int]], tuple[float, int] | None],
    fill: tuple[int, int, int] = ALPHA_BACKGROUND,
    max_pixels: int | None = None,
    need_side: float | None = None,
    pixels: bool = False,
) -> Image.Image | DecodedRGB:
    """:func:`load_rgb` for a crop drawn before decoding: ``crop_for((width, height))`` (upright full size) returns
    ``(crop_side, out_side)`` -- the crop's shorter side in full-size pixels and the side it is resized to -- or
    None. A JPEG is then decoded at the largest DCT scale (1/2, 1/4, 1/8) that still gives the crop at least
    ``out_side`` pixels, so the crop is only ever shrunk, as from the full image; the crop box scales by the full
    size (``info`` :data:`SOURCE_SIZE`) over the returned size. benchmarks/bench_decode.py: speed, pixel difference.
    Without a crop (None) it is :func:`load_rgb` with ``need_side``.

    ``pixels=True`` (a transform that takes them, e.g. ``CropFirstRandomResizedCrop``): a plain upright JPEG is
    decoded by :mod:`dalg.data.jpeg_pixels` into a :class:`DecodedRGB` instead, at any libjpeg scale (7/8 ... 1/8).
    """
    if pixels:
        decoded = jpeg_pixels.decode_for_crop(path, crop_for, max_pixels)
        if decoded is not None:
            return decoded

    def factor_of(size: tuple[int, int], orientation: int) -> int:
        upright = size[::-1] if orientation in (5, 6, 7, 8) else size
        crop = crop_for(upright)
        if crop is None:
            return dct_factor(max(size), DRAFT_MARGIN * need_side) if need_side else 1
        return dct_factor(crop[0], crop[1])

    return _load(path, fill, max_pixels, factor_of)


def _load(path, fill, max_pixels, factor_of) -> Image.Image:
    """Open, draft at ``factor_of((width, height), EXIF orientation)`` (JPEG only), check the size, decode,
    upright."""
    img = None
    try:
        img = Image.open(path)  # PIL's guard raises past 2 x Image.MAX_IMAGE_PIXELS (it only warns below)
        full = img.size
        orientation = _orientation(img)  # from the header: parsed once
        if img.format == "JPEG":
            _draft(img, factor_of(full, orientation))
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise ImageReadError(
                path,
                f"{img.width}x{img.height} = {img.width * img.height / 1e6:.1f} MP to "
                f"decode, above the limit of {max_pixels / 1e6:.1f} MP (max_pixels)",
                "too_large",
            )
        img.load()
        # upright: a transposed copy only when the EXIF asks for it (a copy of a 2 MP photo costs ~0.5 ms); a
        # loaded single-frame image has closed its file and is returned as it is, else it is copied and closed
        out = _upright(img) if orientation != 1 else img if img.fp is None else img.copy()
        out = to_rgb(out, fill)
        if img.size != full:  # reduced: the test transform sizes by the full image, as the header scan does
            out.info[SOURCE_SIZE] = full[::-1] if orientation in (5, 6, 7, 8) else full
        if out is not img:
            img.close()
        return out
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        if img is not None:
            img.close()
        raise _classify(path, e) from e
    except BaseException:
        if img is not None:
            img.close()
        raise


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - broken EXIF: the image keeps its stored orientation (see _upright)
        return 1


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) after EXIF orientation, read from the header only (no decoding)."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            try:
                orientation = img.getexif().get(0x0112, 1)
            except Exception:  # noqa: BLE001 - broken EXIF: load_rgb keeps the stored orientation too
                orientation = 1
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise _classify(path, e) from e
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
