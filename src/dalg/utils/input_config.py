"""What a backbone expects of its input: normalisation mean/std, resize interpolation, and a size multiple.

Mean, std and interpolation come from the timm model's ``pretrained_cfg`` (timm's data config): ImageNet
statistics for ResNets and DeiT, mean = std = 0.5 for the AugReg ``vit_*`` weights. Each can be overridden in
the backbone config (``model.backbone.mean/std/interpolation``). ``size_multiple`` is the side length every
evaluation image is resized to a multiple of, so that no padding happens inside the model: the patch size for a
ViT (timm would zero-pad to it), 1 for a CNN (DOLG's ResNet takes any size, as in its release).

The resolved config travels with the network (``DALG.input_config``) and with its checkpoints
(``RetrievalModule`` stores it in the hyper-parameters), so evaluation uses the values training used.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# names shared by PIL and torchvision's InterpolationMode (timm's configs use bilinear / bicubic)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


def _triple(value: Any, what: str, positive: bool) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        value = (value,) * 3
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or not all(math.isfinite(v) for v in out) or (positive and min(out) <= 0):
        rule = "three finite numbers > 0" if positive else "three finite numbers"
        raise ValueError(f"input {what} must be {rule} (one per RGB channel), got {value!r}")
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class InputConfig:
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    size_multiple: int = 1
    source: str = field(default="", compare=False)  # where the values came from, for reports

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", _triple(self.mean, "mean", positive=False))
        object.__setattr__(self, "std", _triple(self.std, "std", positive=True))
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"input interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}"
            )
        if (
            isinstance(self.size_multiple, bool)
            or int(self.size_multiple) != self.size_multiple
            or self.size_multiple < 1
        ):
            raise ValueError(f"input size_multiple must be an integer >= 1, got {self.size_multiple!r}")
        object.__setattr__(self, "size_multiple", int(self.size_multiple))

    @property
    def fill_rgb(self) -> tuple[int, int, int]:
        """The mean as an 8-bit colour: pixels of this colour normalise to ~0 (used for transparent areas)."""
        return tuple(round(255 * m) for m in self.mean)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any] | InputConfig, where: str = "input config"
    ) -> InputConfig:
        if isinstance(values, InputConfig):
            return values
        known = {"mean", "std", "interpolation", "size_multiple", "source"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; expected some of {sorted(known)}")
        return cls(
            **{
                k: (list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v)
                for k, v in values.items()
            }
        )

    def describe(self) -> str:
        mean = ", ".join(f"{v:g}" for v in self.mean)
        std = ", ".join(f"{v:g}" for v in self.std)
        return f"mean ({mean}), std ({std}), {self.interpolation}, sides multiple of {self.size_multiple}"


def resolve_input_config(
    timm_model: Any,
    size_multiple: int,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    interpolation: str | None = None,
) -> InputConfig:
    """The one place the input config is decided: timm's data config of ``timm_model`` (from its
    ``pretrained_cfg``, whether or not the weights were loaded), with any given value overriding it."""
    from timm.data import resolve_model_data_config

    data = resolve_model_data_config(timm_model)
    cfg = getattr(timm_model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture") or type(timm_model).__name__
    tag = f"{arch}.{cfg['tag']}" if cfg.get("tag") else arch
    overridden = [
        k for k, v in (("mean", mean), ("std", std), ("interpolation", interpolation)) if v is not None
    ]
    source = f"timm data config of {tag}" + (
        f"; {', '.join(overridden)} from model.backbone" if overridden else ""
    )
    return InputConfig(
        mean=mean if mean is not None else data["mean"],  # a number: the same for R, G and B
        std=std if std is not None else data["std"],
        interpolation=str(interpolation if interpolation is not None else data["interpolation"]),
        size_multiple=size_multiple,
        source=source,
    )


def legacy_input_config(size_multiple: int) -> InputConfig:
    """What every model was trained with before input configs were resolved: ImageNet mean/std, bilinear."""
    return InputConfig(
        IMAGENET_MEAN,
        IMAGENET_STD,
        "bilinear",
        size_multiple,
        source="ImageNet defaults (checkpoint written before input configs were stored)",
    )


def checkpoint_input_config(hparams: Mapping[str, Any], built: InputConfig, where: str) -> InputConfig:
    """The input config stored in a checkpoint's hyper-parameters, or, for an older checkpoint without one, the
    ImageNet values it was trained with (said once in the log). ``built`` = the config of the freshly built
    network (its size multiple is kept: it is a property of the architecture)."""
    stored = hparams.get("input_config") if hparams else None
    if stored is not None:
        return InputConfig.from_mapping(stored, where=f"{where}: hyper_parameters.input_config")
    legacy = legacy_input_config(built.size_multiple)
    log.warning(
        "%s has no stored input config (written before they were recorded): using the ImageNet "
        "mean/std and bilinear resizing it was trained with (%s)",
        where,
        legacy.describe(),
    )
    return legacy
