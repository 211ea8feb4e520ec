"""Multi-scale descriptors (DOLG's test protocol): the one loop used by ``DALG.extract`` and ``dalg.inference``.

Each scale ``s`` other than 1 resizes the batch so that every side becomes ``round(side * s)``, rounded to the
nearest multiple of the model's ``size_multiple`` (the ViT patch size, so that no padding happens; 1 for a CNN)
and never below it. Scale 1 passes the input through unchanged: sizing it is the test transform's job. How the
resize interpolates is ``ScaleResize`` (``model.scale_resize`` in the configs). DOLG's release resizes with
``cv2.resize(..., INTER_LINEAR)`` to ``round(side * s)``: bilinear with half-pixel centres and no antialiasing,
i.e. ``ScaleResize(mode="bilinear", antialias=False)`` with a size multiple of 1.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from dalg.utils.sizes import scaled_side  # the one rounding rule of test sides (data uses it too)

MODES = ("bilinear", "bicubic", "area", "nearest", "nearest-exact")


@dataclass(frozen=True)
class ScaleResize:
    mode: str = "bilinear"
    antialias: bool = True  # torch's antialiased down-sampling (bilinear/bicubic only); DOLG's release: none

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"scale_resize.mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.antialias, bool):
            raise ValueError(f"scale_resize.antialias must be true or false, got {self.antialias!r}")
        if self.antialias and self.mode not in ("bilinear", "bicubic"):
            raise ValueError(f"scale_resize.antialias=true needs mode bilinear or bicubic, got {self.mode!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | ScaleResize | None) -> ScaleResize:
        if values is None:
            return cls()
        if isinstance(values, ScaleResize):
            return values
        unknown = sorted(set(values) - {"mode", "antialias"})
        if unknown:
            raise ValueError(f"scale_resize: unknown keys {unknown}; expected some of ['antialias', 'mode']")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __call__(self, x: Tensor, scale: float, size_multiple: int = 1) -> Tensor:
        if scale == 1.0:
            return x
        size = tuple(scaled_side(side, scale, size_multiple) for side in x.shape[-2:])
        if size == tuple(x.shape[-2:]):
            return x
        corners = {"align_corners": False} if self.mode in ("bilinear", "bicubic") else {}
        return F.interpolate(x, size=size, mode=self.mode, antialias=self.antialias, **corners)


def check_scales(scales: Sequence[float], where: str) -> tuple[float, ...]:
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0:
        raise ValueError(f"{where}: scales must be a non-empty list of positive factors, got {list(scales)}")
    return scales


def effective_scales(scales: Sequence[float] | None, model: object) -> tuple[float, ...]:
    """The scales an extraction runs at: ``scales`` when given, else the model's own (``model.scales``), else
    1 alone. The one fallback, for ``DALG.extract``, ``dalg.inference`` and the Lightning module's test scales."""
    chosen = scales if scales is not None else (getattr(model, "scales", None) or (1.0,))
    return check_scales(chosen, "multi-scale extraction")


def multiscale_descriptor(
    forward: Callable[[Tensor], Tensor],
    x: Tensor,
    scales: Sequence[float],
    resize: ScaleResize,
    size_multiple: int = 1,
) -> Tensor:
    """Sum of ``forward`` (L2-normalised descriptors) over the scales, L2-normalised (DOLG's protocol)."""
    acc = None
    for s in check_scales(scales, "multi-scale extraction"):
        d = forward(resize(x, s, size_multiple))
        acc = d if acc is None else acc + d
    return F.normalize(acc, p=2, dim=-1)
