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
from torchvision.transforms import functional as TF
from torchvision.transforms.v2 import functional as TF2

from dalg.data.device_augment import DeviceAugment
from dalg.data.images import SOURCE_SIZE, DecodedRGB
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

    def __init__(
        self, transforms: list, input_config: InputConfig, device_augment: DeviceAugment | None = None
    ):
        super().__init__(transforms)
        self.input_config = input_config
        self.fill_rgb = input_config.fill_rgb
        # what finishes the transform on the batch (uint8 -> jittered, normalised float), or None: the transform's
        # output is already the model's input
        self.device_augment = device_augment
        # the loader may hand it DecodedRGB pixels (dalg.data.jpeg_pixels) instead of a PIL image
        self.accepts_pixels = bool(transforms) and isinstance(transforms[0], CropFirstRandomResizedCrop)

    def finish(self, images: torch.Tensor) -> torch.Tensor:
        """This transform's output for one image or a batch, ready for the model (tests, tools without a
        data module): ``device_augment`` applied when there is one."""
        if self.device_augment is None:
            return images
        out = self.device_augment(images[None] if images.ndim == 3 else images)
        return out[0] if images.ndim == 3 else out

    def crop_for(self, full_size: tuple[int, int]) -> tuple[float, int] | None:
        """Draw the first transform's random crop for an image of ``full_size`` before it is decoded:
        ``(crop's shorter side, output side)`` for ``dalg.data.images.load_rgb_for_crop``, or None."""
        first = self.transforms[0] if self.transforms else None
        return first.plan(full_size) if isinstance(first, CropFirstRandomResizedCrop) else None


# interpolations torch resizes uint8 images with (SIMD, antialiased: ~8x faster than PIL's bicubic on a CPU core);
# the others go through PIL (torch's "nearest" also picks other source pixels than PIL's)
_TORCH_UINT8 = {"bilinear", "bicubic"}


class CropFirstRandomResizedCrop(T.RandomResizedCrop):
    """torchvision's ``RandomResizedCrop`` from a PIL image to a ``uint8`` CHW tensor, whose crop can be drawn from
    the full size before decoding (``plan``), so that the loader decodes a large JPEG at reduced size
    (``load_rgb_for_crop``); the planned box is then scaled to the decoded image (rounded to its pixels) and
    resized from there. An image without a matching plan gets a crop drawn from its own size.

    The resize runs in torch on ``uint8`` pixels (antialiased bilinear/bicubic, as PIL's): the largest cost of a
    training worker after decoding. Other interpolations (nearest, lanczos, box, hamming) use PIL's resize.
    benchmarks/bench_decode.py measures speed and the difference to PIL (tests/test_data_crop_first.py bounds it).
    """

    def plan(self, full_size: tuple[int, int]) -> tuple[float, int]:
        w, h = full_size
        top, left, ch, cw = self.get_params(torch.empty((1, h, w), dtype=torch.uint8), self.scale, self.ratio)
        self._plan = ((w, h), (top, left, ch, cw))
        return float(min(ch, cw)), int(min(self.size))

    def forward(self, img):
        if not isinstance(img, (Image.Image, DecodedRGB)):
            raise TypeError(
                f"CropFirstRandomResizedCrop takes a PIL image or DecodedRGB pixels, got {type(img).__name__}"
            )
        return resized_crop_uint8(img, self.box_for(img), self.size, self.interpolation.value)

    def box_for(self, img: Image.Image | DecodedRGB) -> tuple[int, int, int, int]:
        """The crop ``(x0, y0, x1, y1)`` in ``img``'s pixels: the plan's box scaled to the decoded size and
        rounded to its pixels (a shift of at most half a decoded pixel), else a box drawn from ``img``."""
        plan, self._plan = getattr(self, "_plan", None), None
        if plan is not None and tuple(img.info.get(SOURCE_SIZE, img.size)) == plan[0]:
            full, (top, left, ch, cw) = plan
            sx, sy = img.width / full[0], img.height / full[1]  # libjpeg rounds each side up on its own
            x0, y0 = round(left * sx), round(top * sy)
            x1 = min(max(round((left + cw) * sx), x0 + 1), img.width)
            y1 = min(max(round((top + ch) * sy), y0 + 1), img.height)
        else:
            dims = torch.empty(
                (1, img.height, img.width), dtype=torch.uint8
            )  # get_params reads only the size
            top, left, ch, cw = self.get_params(dims, self.scale, self.ratio)
            x0, y0, x1, y1 = left, top, left + cw, top + ch
        return x0, y0, x1, y1


def resized_crop_uint8(
    img: Image.Image | DecodedRGB, box: tuple[int, int, int, int], size: Sequence[int], interpolation: str
) -> torch.Tensor:
    """The pixel box ``(x0, y0, x1, y1)`` of ``img`` resized to ``size`` (h, w): a ``uint8`` (3, h, w) tensor."""
    x0, y0, x1, y1 = box
    if isinstance(img, DecodedRGB):
        if interpolation not in _TORCH_UINT8:
            img = Image.fromarray(img.pixels)
        else:  # a view of the box: HWC memory seen as CHW, the layout of torch's fast uint8 resize
            pixels = torch.from_numpy(img.pixels[y0:y1, x0:x1]).permute(2, 0, 1)
            return _resize_uint8(pixels, size, interpolation)
    if interpolation not in _TORCH_UINT8:
        crop = img.resize((size[1], size[0]), _PIL_RESAMPLING[interpolation], box=box)
        return TF.pil_to_tensor(crop)
    # only the box leaves PIL (a copy of the whole decoded image costs more than the resize)
    return _resize_uint8(TF.pil_to_tensor(img.crop(box)), size, interpolation)


def _resize_uint8(pixels: torch.Tensor, size: Sequence[int], interpolation: str) -> torch.Tensor:
    return TF2.resize(
        pixels[None], list(size), interpolation=T.InterpolationMode(interpolation), antialias=True
    )[0]


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
    """Random resized crop (DOLG's loader: area 0.08-1) + flip at ``size`` x ``size``, as ``uint8`` tensors; the
    light colour jitter and the normalisation run on the batch, on the training device (``device_augment``:
    :class:`dalg.data.device_augment.DeviceAugment`, applied by the data module after the transfer)."""
    config = input_config or _DEFAULT
    ops: list = [
        CropFirstRandomResizedCrop(
            size, scale=tuple(scale), ratio=tuple(ratio), antialias=True, interpolation=_interpolation(config)
        )
    ]
    if hflip > 0:
        ops.append(T.RandomHorizontalFlip(hflip))
    return ModelTransform(ops, config, device_augment=DeviceAugment(color_jitter, config.mean, config.std))


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
