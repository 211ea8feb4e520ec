"""A training crop's JPEG decoded straight into ``uint8`` pixels, at the smallest scale that still serves the crop.

``simplejpeg`` (libjpeg-turbo's TurboJPEG API) decodes into a NumPy array at libjpeg's DCT scales, without PIL's
4-bytes-per-pixel internal copy: on 1600x1200 JPEGs it decodes in 8.6 ms what PIL decodes in 9.9 ms at full size
(experiments/bench/NOTES.md). The scale is PIL's rule (the largest of 1/2, 1/4, 1/8 that leaves the crop its output
side: :func:`dct_factor`), so both paths give the crop the same pixels up to the decoder's rounding.

Only plain JPEGs take this path: baseline/progressive YCbCr or grey, upright (EXIF orientation 1), within
``max_pixels``. Everything else, and every file this path cannot decode, goes to :func:`dalg.data.images.load_rgb`'s
PIL path, which applies orientation, converts CMYK and classifies broken files; so reports stay the same.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

try:  # a dependency (pyproject); without it every image takes the PIL path
    import simplejpeg
except ImportError:  # pragma: no cover - exercised only where the wheel is missing
    simplejpeg = None

SOURCE_SIZE = "dalg_source_size"  # the same key as dalg.data.images.SOURCE_SIZE (which imports it from here)


@dataclass
class DecodedRGB:
    """Upright RGB pixels ``(height, width, 3)`` ``uint8`` and, in ``info``, the full size they were decoded from
    (``SOURCE_SIZE``: (width, height)), as a PIL image decoded at reduced size carries it."""

    pixels: np.ndarray
    info: dict = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.pixels.shape[1]), int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


def available() -> bool:
    return simplejpeg is not None


def dct_factor(side: float, need: float) -> int:
    """The largest JPEG DCT scaling divisor (8, 4, 2, else 1) that still leaves ``side / divisor >= need``."""
    return next((f for f in (8, 4, 2) if side / f >= need), 1)


def decode_for_crop(
    path: str | os.PathLike,
    crop_for: Callable[[tuple[int, int]], tuple[float, int] | None],
    max_pixels: int | None = None,
) -> DecodedRGB | None:
    """The JPEG at ``path`` decoded at the smallest libjpeg scale that leaves the crop ``crop_for((w, h))``
    (``(crop's shorter side, output side)``) at least its output side; None when the file must take the PIL path
    (not a plain upright JPEG, no crop, or any error: PIL then reads and classifies it)."""
    if simplejpeg is None:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
        if not data.startswith(b"\xff\xd8"):
            return None
        _, _, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("YCbCr", "Gray"):  # CMYK/YCCK and RGB-coded JPEGs: PIL converts them
            return None
        with Image.open(io.BytesIO(data)) as header:  # the header only: format and EXIF orientation
            if header.format != "JPEG" or int(header.getexif().get(0x0112, 1)) != 1:
                return None
            width, height = header.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    if max_pixels is not None and width * height > max_pixels:
        return None  # the PIL path refuses it with the usual message (or decodes it reduced below the limit)
    crop = crop_for((width, height))
    if crop is None:
        return None
    # 1/2, 1/4, 1/8 only: libjpeg-turbo's other scales (7/8 ... 3/8) skip its SIMD inverse DCT and decode slower
    # than the full size (9.5 vs 8.6 ms at 3/4 of 1600x1200)
    factor = dct_factor(crop[0], crop[1])
    try:
        pixels = simplejpeg.decode_jpeg(
            data, colorspace="RGB", min_width=math.ceil(width / factor), min_height=math.ceil(height / factor)
        )  # strict: a truncated file raises, and the PIL path reports it
    except ValueError:
        return None
    out = DecodedRGB(pixels)
    if out.size != (width, height):
        out.info[SOURCE_SIZE] = (width, height)
    return out
