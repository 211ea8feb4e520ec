"""Test sizes and image-size arithmetic shared by the data (the test transform, batching by shape), the config
checks and the models (the per-scale resize). ``test_size`` is the longer side at test time, or null / "original"
for each image's own size; every side is then rounded to the nearest multiple of the model's ``size_multiple`` (a
ViT's patch size, 1 for a CNN), at least one multiple, so the network never pads."""

from __future__ import annotations

ORIGINAL = "original"  # test_size value (also null): keep the image's own size


def parse_test_size(value: object, where: str = "test_size") -> int | None:
    """A positive number of pixels (the longer side), or None for the image's own size (null / "original")."""
    if value is None or (isinstance(value, str) and value.strip().lower() in (ORIGINAL, "null", "none")):
        return None
    try:
        size = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        size = 0
    if isinstance(value, bool) or size <= 0 or size != value and str(size) != str(value).strip():
        raise ValueError(
            f"{where}={value!r}: expected a positive number of pixels (the longer image side), "
            f"or null / {ORIGINAL!r} to keep each image's own size"
        )
    return size


def describe_test_size(test_size: int | None) -> int | str:
    """For records (JSON, tables): the longer side in pixels, or "original"."""
    return ORIGINAL if test_size is None else int(test_size)


def round_to_multiple(side: float, multiple: int = 1) -> int:
    """``side`` to the nearest multiple of ``multiple`` (at least one multiple)."""
    return max(multiple, round(side / multiple) * multiple)


def scaled_side(side: int, scale: float, size_multiple: int = 1) -> int:
    """``round(side * scale)`` to the nearest multiple of ``size_multiple``: one side at one test scale."""
    return round_to_multiple(side * scale, size_multiple)


def resized_shape(width: int, height: int, test_size: int | None, size_multiple: int = 1) -> tuple[int, int]:
    """(height, width) after scaling the longer side to ``test_size`` (None: no scaling), aspect ratio kept,
    then each side to the nearest multiple of ``size_multiple``. The test transform's output shape."""
    s = 1.0 if test_size is None else test_size / max(width, height)
    return round_to_multiple(height * s, size_multiple), round_to_multiple(width * s, size_multiple)
