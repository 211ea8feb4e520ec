"""The end of the training augmentation, run on the batch on the training device: colour jitter and
normalisation of the ``uint8`` crops the loader workers produce.

Why here: on a CPU worker the jitter and the float conversion cost as much as the crop's resize (~2.4 + 2.4 ms of
~26 ms per 512 px image, benchmarks/bench_decode.py); on the device they are a few element-wise passes over the
batch, and the batch crosses to the device as ``uint8`` (a quarter of float32's bytes). timm's prefetching loader
normalises on the device for the same reasons.

The jitter is torchvision's ``ColorJitter(b, c, s, hue=0)`` on float images: per image, factors drawn uniformly
from ``[1 - j, 1 + j]`` and the three operations in a random order, each a blend clamped to [0, 1]:
brightness towards black, contrast towards the image's mean grey, saturation towards each pixel's grey
(ITU-R 601-2 luma weights). Unlike the PIL path it does not round to 8 bits between the operations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale and PIL's convert("L")
_LUMA = (0.2989, 0.587, 0.114)


class DeviceAugment:
    """``uint8`` (N, 3, H, W) images -> colour-jittered (``color_jitter`` > 0) and normalised float32 images."""

    def __init__(self, color_jitter: float, mean: Sequence[float], std: Sequence[float]):
        if not 0 <= float(color_jitter) < 1:
            raise ValueError(f"color_jitter must be in [0, 1), got {color_jitter}")
        self.color_jitter = float(color_jitter)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __repr__(self) -> str:
        return f"DeviceAugment(color_jitter={self.color_jitter}, mean={self.mean}, std={self.std})"

    def __call__(
        self,
        images: torch.Tensor,
        jitter: bool = True,
        generator: torch.Generator | None = None,
        drawn: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``drawn``: given (factors, order) instead of random ones (see :meth:`draw`; benchmarks and tests)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        # in 0..255 (the jitter is linear, its clamp scales): one conversion pass and one normalisation pass
        x = images.to(torch.float32, memory_format=torch.contiguous_format)
        if jitter and (self.color_jitter > 0 or drawn is not None):
            x = self.jitter(x, generator, drawn)
        inv_std = 1.0 / (255.0 * torch.tensor(self.std, device=x.device).view(1, 3, 1, 1))
        bias = -torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1) * 255.0 * inv_std
        return torch.addcmul(bias, x, inv_std)

    def draw(self, n: int, device: torch.device, generator: torch.Generator | None = None):
        """Per image: (factors (n, 3) for brightness/contrast/saturation, order (n, 3) of the operations)."""
        j = self.color_jitter
        factors = torch.empty(n, 3, device=device).uniform_(1 - j, 1 + j, generator=generator)
        order = torch.rand(n, 3, device=device, generator=generator).argsort(dim=1)
        return factors, order

    def jitter(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        drawn: tuple[torch.Tensor, torch.Tensor] | None = None,
        top: float = 255.0,
    ) -> torch.Tensor:
        """Float images in [0, ``top``] -> jittered, in [0, ``top``]. Every operation is a clamped blend
        ``f * x + (1 - f) * target`` (``lerp``); each step applies, per image, the operation its order puts there."""
        n = x.shape[0]
        factors, order = drawn if drawn is not None else self.draw(n, x.device, generator)
        factors, order = factors.to(x.device, x.dtype), order.to(x.device)
        luma = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 1, 3)
        h, w = x.shape[2:]
        for step in range(3):
            op = order[:, step]
            f = factors.gather(1, op[:, None]).view(n, 1, 1, 1)
            is_contrast = (op == 1).to(x.dtype).view(n, 1, 1, 1)
            is_saturation = (op == 2).to(x.dtype).view(n, 1, 1, 1)
            grey = torch.matmul(luma, x.view(n, 3, h * w)).view(n, 1, h, w)  # (n, 1, H, W)
            # target: 0 for brightness, the mean grey for contrast, the pixel's grey for saturation
            target = torch.addcmul(grey.mean(dim=(2, 3), keepdim=True) * is_contrast, grey, is_saturation)
            x = torch.lerp(target, x, f).clamp_(0.0, top)
        return x
