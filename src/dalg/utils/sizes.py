"""Image-size arithmetic shared by the data (the test transform, batching by shape) and the models (the per-scale
resize): every side is rounded to the nearest multiple of the model's ``size_multiple`` (a ViT's patch size, 1 for
a CNN), at least one multiple, so the network never pads."""

from __future__ import annotations


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
