"""Train and test transforms. Test images keep their aspect ratio: the longer side becomes ``test_size``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(size: int, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                    hflip: float = 0.5, color_jitter: float = 0.2) -> T.Compose:
    """Random resized crop (DOLG's loader: area 0.08-1) + flip + light colour jitter, at ``size`` x ``size``."""
    ops: list = [T.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio), antialias=True)]
    if hflip > 0:
        ops.append(T.RandomHorizontalFlip(hflip))
    if color_jitter > 0:
        ops.append(T.ColorJitter(color_jitter, color_jitter, color_jitter, 0.0))
    ops += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(ops)


def holdout_transform(size: int) -> T.Compose:
    """Deterministic view of a training-class image for the classification hold-out: the shorter side resized
    to ``size``, centre crop ``size`` x ``size`` (the training crops' shape, without their randomness)."""
    return T.Compose([T.Resize(size, antialias=True), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def resized_shape(width: int, height: int, test_size: int) -> tuple[int, int]:
    """(height, width) after scaling the longer side to ``test_size``, aspect ratio kept."""
    s = test_size / max(width, height)
    return max(1, round(height * s)), max(1, round(width * s))


class EvalTransform:
    """Resize so that the longer side is ``test_size`` (aspect kept, no crop), then normalise."""

    def __init__(self, test_size: int):
        if test_size <= 0:
            raise ValueError(f"test_size must be positive, got {test_size}")
        self.test_size = test_size
        self._to_tensor = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __call__(self, img: Image.Image) -> torch.Tensor:
        h, w = resized_shape(img.width, img.height, self.test_size)
        return self._to_tensor(img.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=None))

    def __repr__(self) -> str:
        return f"EvalTransform(test_size={self.test_size})"


def eval_transform(test_size: int) -> EvalTransform:
    return EvalTransform(test_size)
