"""Reading images from disk: one function, one error type, so every dataset fails and reports the same way."""

from __future__ import annotations

import os

from PIL import Image, ImageOps


class ImageReadError(RuntimeError):
    """An image file that is missing or cannot be decoded; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"cannot read image {os.fspath(path)!r}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` fully into an upright RGB image (EXIF orientation applied)."""
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return img.convert("RGB")
    except FileNotFoundError as e:
        raise ImageReadError(path, "file does not exist") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(path, f"{type(e).__name__}: {e}") from e


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) after EXIF orientation, read from the header only (no decoding)."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
    except FileNotFoundError as e:
        raise ImageReadError(path, "file does not exist") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(path, f"{type(e).__name__}: {e}") from e
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
