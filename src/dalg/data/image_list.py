"""Test images by path, the items every evaluation set and src/extract.py read: ``(tensor, index)``.

:class:`ImageList` decodes an image (optionally cropped to a box first) with the decoding limits of
:func:`dalg.data.images.load_rgb` and applies the test transform; :func:`resized_sizes` reads the headers only and
gives each image's shape after the transform, which batches images of equal shape together (no padding, no crop).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from dalg.data.images import ImageReadError, fill_for, image_size, load_rgb
from dalg.utils.sizes import resized_shape


class ImageList(Dataset):
    """Images ``paths[i]`` as ``(transform(image), i)``.

    ``max_pixels`` caps the pixels an image decodes to; ``decode_side`` (the test size) lets a large JPEG decode at
    reduced size. A subclass that crops (the queries of an evaluation set) overrides :meth:`crop_box`.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], transform: Callable | None = None):
        self.paths: list[Path] = [Path(p) for p in paths]
        self.transform = transform
        self.max_pixels: int | None = None
        self.decode_side: float | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def crop_box(self, index: int) -> tuple[int, int, int, int] | None:
        """The pixel box image ``index`` is cropped to before the transform; None: the whole image."""
        return None

    def source_size(self, index: int) -> tuple[int, int]:
        """(width, height) of the image before the transform, read from the file header (no decoding)."""
        box = self.crop_box(index)
        return (box[2] - box[0], box[3] - box[1]) if box else image_size(self.paths[index])

    def load(self, index: int):
        """The PIL image as the model sees it before the transform (crop applied)."""
        box = self.crop_box(index)
        # reduced-size JPEG decoding only without a crop: the box is in the full image's pixels
        img = load_rgb(
            self.paths[index],
            fill_for(self.transform),
            max_pixels=self.max_pixels,
            need_side=None if box else self.decode_side,
        )
        return img.crop(box) if box else img

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.load(index)
        return (self.transform(img) if self.transform else img), index


def resized_sizes(
    images: ImageList, indices: Iterable[int], test_size: int | None, size_multiple: int = 1
) -> tuple[dict[int, tuple[int, int]], dict[int, ImageReadError]]:
    """(height, width) after the test transform of each image in ``indices``, from headers only, and the images
    whose header could not be read (index -> error)."""
    sizes: dict[int, tuple[int, int]] = {}
    errors: dict[int, ImageReadError] = {}
    for i in indices:
        try:
            sizes[i] = resized_shape(*images.source_size(i), test_size, size_multiple)
        except ImageReadError as e:
            errors[i] = e
    return sizes, errors
