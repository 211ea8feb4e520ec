"""Inference-time optimisations applied to a built DALG/DOLG model from outside (no model code changes).

    from dalg.inference import InferenceOptions, optimize_for_inference
    fast = optimize_for_inference(model)   # automatic choices; InferenceOptions(bf16=False) for exact float32
    desc = fast.extract(images)            # (B, embed_dim) float32, L2-normalised, model.scales by default

What each option does and why:
- eval mode + ``torch.inference_mode`` always (no autograd bookkeeping, BatchNorm/Dropout/DropPath frozen);
- ``channels_last`` (default: only for CNN backbones): oneDNN convolutions run much faster on NHWC on CPU;
- ``bf16``: the backbone and the local branch (almost all FLOPs) run with bf16 weights and activations
  (AMX / AVX512-BF16 on recent Xeons, tensor cores on GPUs); their outputs are cast back to float32, so the
  global pooling, fusion and descriptor stay in float32 and descriptors are float32.  Casting the weights once
  avoids torch.autocast's per-call weight casts and its fp32<->bf16 round trips around norms;
- ``compile``: ``torch.compile`` of the forward pass with inductor's weight freezing (worth it for long runs;
  each new input shape compiles, ~35 s for DALG on 2 CPU cores, so batch by shape, see ``group_by_shape``).

The model passed in is left untouched (a deep copy is optimised) unless ``inplace=True``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dalg.models.multiscale import ScaleResize, effective_scales, multiscale_descriptor
from dalg.utils.batching import batches_by_shape


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has native bf16 matmuls (AMX tiles or AVX512-BF16), so bf16 can beat float32."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, p, lambda: False)()) for p in probes)


def device_has_fast_bf16(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_fast_bf16()
    return False


def is_cnn(model: nn.Module) -> bool:
    """A model whose backbone is convolutional (DOLG's ResNet), where channels-last pays off."""
    backbone = getattr(model, "backbone", model)
    return any(isinstance(m, nn.Conv2d) for m in backbone.modules()) and not hasattr(backbone, "vit")


@dataclass(frozen=True)
class InferenceOptions:
    """``None`` = automatic: channels-last for CNN backbones; bf16 where the device has native bf16 matmuls.

    Automatic bf16 follows `make bench` on a Xeon with AMX (experiments/bench/results.md): faster for both DALG
    and DOLG, descriptors within cosine 0.999 of float32.  ``bf16=False`` gives float32 results bit-for-bit
    comparable with ``model.extract``.
    """

    channels_last: bool | None = None
    bf16: bool | None = None
    compile: bool = False
    compile_mode: str | None = None  # torch.compile mode, e.g. "max-autotune"; None = default
    device: str | None = None  # move the model there; None = where it already is

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> InferenceOptions:
        """From a config section (``inference:`` in conf/eval.yaml, conf/extract.yaml); unknown keys are errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"inference options {unknown} are unknown; expected some of {sorted(known)}")
        return cls(**dict(cfg))

    def resolved(self, model: nn.Module, device: torch.device) -> InferenceOptions:
        cl = is_cnn(model) if self.channels_last is None else self.channels_last
        bf16 = device_has_fast_bf16(device) if self.bf16 is None else self.bf16
        return dataclasses.replace(self, channels_last=cl, bf16=bf16)

    def label(self) -> str:
        parts = [
            name
            for name, on in (
                ("channels-last", self.channels_last),
                ("bf16", self.bf16),
                ("compile", self.compile),
            )
            if on
        ]
        return "+".join(parts) or "fp32"


def _cast_floats(obj: Any, dtype: torch.dtype, memory_format: torch.memory_format | None = None) -> Any:
    """Cast every floating tensor inside a tensor / tuple / list / dict / dataclass to ``dtype``."""
    if isinstance(obj, Tensor):
        if not obj.is_floating_point():
            return obj
        obj = obj.to(dtype)
        if memory_format is not None and obj.dim() == 4:
            obj = obj.contiguous(memory_format=memory_format)
        return obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast_floats(o, dtype, memory_format) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast_floats(v, dtype, memory_format) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(
            obj,
            **{
                f.name: _cast_floats(getattr(obj, f.name), dtype, memory_format)
                for f in dataclasses.fields(obj)
            },
        )
    return obj


class LowPrecisionIsland(nn.Module):
    """Runs ``inner`` with its weights in ``dtype``: inputs are cast in, floating outputs cast back to float32."""

    def __init__(
        self,
        inner: nn.Module,
        dtype: torch.dtype = torch.bfloat16,
        memory_format: torch.memory_format | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner.to(dtype)
        self.dtype = dtype
        self.memory_format = memory_format

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # attributes of the wrapped module (stride, out_dim, ...) stay visible
            return getattr(super().__getattr__("inner"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args = _cast_floats(args, self.dtype, self.memory_format)
        kwargs = _cast_floats(kwargs, self.dtype, self.memory_format)
        return _cast_floats(self.inner(*args, **kwargs), torch.float32)


class InferenceModel:
    """An optimised model with the same ``extract(x, scales)`` contract as ``DALG.extract``."""

    def __init__(self, model: nn.Module, options: InferenceOptions) -> None:
        self.model = model
        self.options = options
        self.scales: tuple[float, ...] = effective_scales(None, model)
        self._memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
        self._forward: Callable[[Tensor], Tensor] = model.forward
        if options.compile:
            import torch._dynamo.config as dynamo_config  # imported only when compiling
            import torch._inductor.config as inductor_config

            compiled = torch.compile(model.forward, mode=options.compile_mode, dynamic=False)

            def frozen_forward(x: Tensor) -> Tensor:
                # Freezing: the weights are constants of the graph (they never change here), so inductor can
                # fold them and, on CPU, prepack them for oneDNN and fuse bias/GELU into the linear layers
                # (1.1-1.2x over plain compile for DALG fp32, outputs within 1e-7). Every (batch, H, W) is its
                # own graph, and dynamo's default limit of 8 graphs per code object (shared by every model of
                # the same class) would silently fall back to eager after 8 shapes: raised to the accumulated
                # limit. Patched per call because each new shape compiles lazily, inside the call.
                limit = dynamo_config.accumulated_recompile_limit
                with inductor_config.patch(freezing=True), dynamo_config.patch(recompile_limit=limit):
                    return compiled(x)

            self._forward = frozen_forward

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, x: Tensor) -> Tensor:
        with torch.inference_mode():
            return self._forward(x.to(self.device).contiguous(memory_format=self._memory_format)).float()

    __call__ = forward

    def extract(self, x: Tensor, scales: Sequence[float] | None = None) -> Tensor:
        """Descriptor averaged over scales and L2-normalised, exactly as ``DALG.extract`` (float32 out): the same
        loop (dalg.models.multiscale) with the model's ``scale_resize`` and input size multiple."""
        resize = getattr(self.model, "scale_resize", None) or ScaleResize()
        config = getattr(self.model, "input_config", None)
        with torch.inference_mode():
            return multiscale_descriptor(
                self.forward,
                x.to(self.device),
                self.scales if scales is None else effective_scales(scales, self.model),
                resize,
                config.size_multiple if config is not None else 1,
            )


def optimize_for_inference(
    model: nn.Module, options: InferenceOptions | None = None, inplace: bool = False
) -> InferenceModel:
    """Eval mode, inference mode, and the chosen options; the one entry point for eval/extract code."""
    options = options or InferenceOptions()
    if not hasattr(model, "forward"):
        raise TypeError(f"optimize_for_inference: expected an nn.Module, got {type(model).__name__}")
    model = model if inplace else copy.deepcopy(model)
    if options.device is not None:
        model = model.to(options.device)
    model.eval()
    device = next(model.parameters()).device
    options = options.resolved(model, device)
    memory_format = torch.channels_last if options.channels_last else None
    if memory_format is not None:
        model = model.to(memory_format=memory_format)
    if options.bf16:
        if not hasattr(model, "backbone"):
            raise ValueError("optimize_for_inference(bf16=True): expects a DALG-style model with .backbone")
        model.backbone = LowPrecisionIsland(model.backbone, torch.bfloat16, memory_format)
        if getattr(model, "local_branch", None) is not None:
            model.local_branch = LowPrecisionIsland(model.local_branch, torch.bfloat16, memory_format)
    for p in model.parameters():
        p.requires_grad_(False)
    return InferenceModel(model, options)


def group_by_shape(images: Sequence[Tensor], max_batch: int) -> list[tuple[list[int], Tensor]]:
    """Batch images of equal (C, H, W) together (aspect-ratio batching, no padding): [(indices, batch)]."""
    if max_batch < 1:
        raise ValueError(f"group_by_shape: max_batch must be >= 1, got {max_batch}")
    for i, img in enumerate(images):
        if img.dim() != 3:
            raise ValueError(f"group_by_shape: image {i} must be (C, H, W), got shape {tuple(img.shape)}")
    batches = batches_by_shape([tuple(img.shape) for img in images], max_batch)
    return [(idx, torch.stack([images[i] for i in idx])) for idx in batches]


def extract_images(
    model: InferenceModel | nn.Module,
    images: Sequence[Tensor],
    scales: Sequence[float] | None = None,
    max_batch: int = 1,
) -> Tensor:
    """Descriptors of variable-size images in input order; equal shapes are batched up to ``max_batch``."""
    if not images:
        raise ValueError("extract_images: no images")
    out: list[Tensor | None] = [None] * len(images)
    for idx, batch in group_by_shape(images, max_batch):
        desc = model.extract(batch, scales).float()
        for j, i in enumerate(idx):
            out[i] = desc[j]
    return torch.stack(out)  # type: ignore[arg-type]
