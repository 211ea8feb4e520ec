"""Small JPEG thumbnails of the images a report shows, written once each beside the page (relative links)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from dalg.data.images import SOURCE_SIZE, ImageReadError, load_rgb


@dataclass
class Thumb:
    src: str | None  # path relative to the page, None when the image could not be read
    width: int = 0  # the upright original's size (query boxes are in its pixels)
    height: int = 0
    error: str | None = None


class Thumbnails:
    """``get(path)`` -> :class:`Thumb` in ``<page dir>/<folder>/``: the longer side ``size`` pixels; each
    source image is decoded once per report (JPEGs at reduced size)."""

    def __init__(self, page_dir: Path, size: int = 192, folder: str = "thumbs", quality: int = 85):
        if size < 16:
            raise ValueError(f"thumbnail size must be >= 16 pixels, got {size}")
        self.page_dir = Path(page_dir)
        self.folder = folder
        self.size = int(size)
        self.quality = int(quality)
        self._done: dict[str, Thumb] = {}

    def get(self, path: str | os.PathLike) -> Thumb:
        key = os.path.abspath(os.path.expanduser(str(path)))
        if key not in self._done:
            self._done[key] = self._make(key)
        return self._done[key]

    def _make(self, path: str) -> Thumb:
        try:
            img = load_rgb(path, need_side=self.size)
        except ImageReadError as e:
            return Thumb(None, error=f"{path}: {e.reason}")
        width, height = img.info.get(SOURCE_SIZE, img.size)
        img.thumbnail((self.size, self.size), Image.Resampling.BICUBIC)
        rel = f"{self.folder}/{hashlib.sha1(path.encode('utf-8')).hexdigest()[:20]}.jpg"
        save_image(img, self.page_dir / rel, self.quality)
        return Thumb(rel, int(width), int(height))


def save_image(img: Image.Image, final: Path, quality: int = 85) -> None:
    """JPEG through a temp file + rename: a browser never sees half a file. No fsync: a thumbnail is cheap to
    redo, and hundreds of fsyncs would dominate the report's time."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    img.save(tmp, format="JPEG", quality=quality)
    os.replace(tmp, final)
