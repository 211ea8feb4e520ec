"""Train and test transforms, normalised with the model's input config (dalg.utils.input_config).

Test images keep their aspect ratio: the longer side becomes ``test_size``, or, with ``test_size`` null
("original"), the image keeps its own size (the revisited protocol and DOLG's release scale the original image).
Each side is then rounded to the nearest multiple of the config's ``size_multiple`` (a ViT's patch size), so
the model never pads: a padded border would enter pooling and attention (the aspect ratio moves by at most half
a patch per side).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torchvision import transforms as T

from dalg.data.images import SOURCE_SIZE
from dalg.utils.input_config import IMAGENET_MEAN, IMAGENET_STD, InputConfig  # noqa: F401  (re-exported)
from dalg.utils.sizes import ORIGINAL, describe_test_size, parse_test_size, resized_shape  # noqa: F401

_DEFAULT = InputConfig(source="ImageNet defaults (no model input config given)")
_PIL_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def _interpolation(config: InputConfig) -> T.InterpolationMode:
    return T.InterpolationMode(config.interpolation)


class ModelTransform(T.Compose):
    """A torchvision ``Compose`` that also carries the model's input config: datasets composite transparent
    pixels over ``fill_rgb`` (the mean), so that they normalise to ~0 whatever the model's mean is."""

    def __init__(self, transforms: list, input_config: InputConfig):
        super().__init__(transforms)
        self.input_config = input_config
        self.fill_rgb = input_config.fill_rgb

    def crop_for(self, full_size: tuple[int, int]) -> tuple[float, int] | None:
        """Draw the first transform's random crop for an image of ``full_size`` before it is decoded:
        ``(crop's shorter side, output side)`` for ``dalg.data.images.load_rgb_for_crop``, or None."""
        first = self.transforms[0] if self.transforms else None
        return first.plan(full_size) if isinstance(first, CropFirstRandomResizedCrop) else None


class CropFirstRandomResizedCrop(T.RandomResizedCrop):
    """torchvision's ``RandomResizedCrop`` whose crop can be drawn from the full size before decoding (``plan``),
    so that the loader decodes a large JPEG at reduced size (``load_rgb_for_crop``); the planned box is then scaled
    to the decoded image and resized from there (PIL ``resize`` with a float box: the same antialiased shrink).
    An image without a matching plan gets torchvision's own crop."""

    def plan(self, full_size: tuple[int, int]) -> tuple[float, int]:
        w, h = full_size
        top, left, ch, cw = self.get_params(torch.empty((1, h, w), dtype=torch.uint8), self.scale, self.ratio)
        self._plan = ((w, h), (top, left, ch, cw))
        return float(min(ch, cw)), int(min(self.size))

    def forward(self, img):
        plan, self._plan = getattr(self, "_plan", None), None
        if plan is not None and isinstance(img, Image.Image):
            full, (top, left, ch, cw) = plan
            if tuple(img.info.get(SOURCE_SIZE, img.size)) == full:
                s = img.width / full[0]
                box = (left * s, top * s, (left + cw) * s, (top + ch) * s)
                return img.resize(
                    (self.size[1], self.size[0]), _PIL_RESAMPLING[self.interpolation.value], box=box
                )
        return super().forward(img)


def _normalise(config: InputConfig) -> list:
    return [T.ToTensor(), T.Normalize(config.mean, config.std)]


def train_transform(
    size: int,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    color_jitter: float = 0.2,
    input_config: InputConfig | None = None,
) -> ModelTransform:
    """Random resized crop (DOLG's loader: area 0.08-1) + flip + light colour jitter, at ``size`` x ``size``."""
    config = input_config or _DEFAULT
    ops: list = [
        CropFirstRandomResizedCrop(
            size, scale=tuple(scale), ratio=tuple(ratio), antialias=True, interpolation=_interpolation(config)
        )
    ]
    if hflip > 0:
        ops.append(T.RandomHorizontalFlip(hflip))
    if color_jitter > 0:
        ops.append(T.ColorJitter(color_jitter, color_jitter, color_jitter, 0.0))
    return ModelTransform(ops + _normalise(config), config)


def holdout_transform(size: int, input_config: InputConfig | None = None) -> ModelTransform:
    """Deterministic view of a training-class image for the classification hold-out: the shorter side resized
    to ``size``, centre crop ``size`` x ``size`` (the training crops' shape, without their randomness)."""
    config = input_config or _DEFAULT
    return ModelTransform(
        [T.Resize(size, antialias=True, interpolation=_interpolation(config)), T.CenterCrop(size)]
        + _normalise(config),
        config,
    )


class EvalTransform:
    """Resize so that the longer side is ``test_size`` (None: the image's own size; aspect kept, no crop), each
    side to a multiple of the input config's ``size_multiple``, then normalise with its mean/std."""

    def __init__(self, test_size: int | None, input_config: InputConfig | None = None):
        self.test_size = parse_test_size(test_size)
        self.input_config = input_config or _DEFAULT
        self.fill_rgb = self.input_config.fill_rgb
        self._resample = _PIL_RESAMPLING[self.input_config.interpolation]
        self._to_tensor = T.Compose(_normalise(self.input_config))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        # a JPEG decoded at reduced size is sized by its full size, as the batches' header scan sizes it
        h, w = resized_shape(
            *img.info.get(SOURCE_SIZE, img.size), self.test_size, self.input_config.size_multiple
        )
        if (w, h) != img.size:
            img = img.resize((w, h), self._resample, reducing_gap=None)
        return self._to_tensor(img)

    def __repr__(self) -> str:
        return (
            f"EvalTransform(test_size={describe_test_size(self.test_size)}, {self.input_config.describe()})"
        )


def eval_transform(test_size: int | None, input_config: InputConfig | None = None) -> EvalTransform:
    return EvalTransform(test_size, input_config)
