"""Optimiser parameter groups (weight-decay split, layer-wise lr decay) and the warm-up + cosine lr schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    # norms, biases, GeM's p, position embeddings and class tokens are not decayed (ViT/DeiT practice)
    return param.ndim <= 1 or name.endswith(
        (".bias", "pos_embed", "cls_token", "reg_token", "dist_token", ".p")
    )


def find_backbone(module: nn.Module) -> tuple[str, nn.Module] | None:
    """``(prefix, backbone)`` of the first submodule with the backbone layer interface (``num_layers``,
    ``layer_id``; see dalg.models.backbones), e.g. ``("net.backbone.", ...)`` in a RetrievalModule."""
    for name, sub in module.named_modules():
        if hasattr(sub, "layer_id") and hasattr(sub, "num_layers"):
            return (name + "." if name else ""), sub
    return None


def parameter_groups(
    module: nn.Module, weight_decay: float, layer_decay: float | None = None, no_decay_bias_norm: bool = True
) -> list[dict]:
    """Groups keyed by (no-decay?, layer). With ``layer_decay``, the backbone's layer ``i`` of ``L`` (its own
    ``layer_id``: embeddings 0, ViT block k -> k + 1, ...) trains at ``lr * layer_decay ** (L - i)``; everything
    outside the backbone (branches, fusion, descriptor, margin head) at ``lr`` (BEiT/MAE layer-wise decay).
    ``no_decay_bias_norm=False`` decays every parameter (``no_weight_decay``'s exceptions included), as DOLG's
    release does."""
    found = find_backbone(module) if layer_decay is not None else None
    groups: dict[tuple[bool, int], dict] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        skip = no_decay_bias_norm and no_weight_decay(name, p)
        layer, scale = 0, 1.0
        if found is not None:
            prefix, backbone = found
            top = int(backbone.num_layers)
            layer = int(backbone.layer_id(name[len(prefix) :])) if name.startswith(prefix) else top
            scale = float(layer_decay ** (top - layer))
        g = groups.setdefault(
            (skip, layer),
            {"params": [], "weight_decay": 0.0 if skip else weight_decay, "lr_scale": scale, "names": []},
        )
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base lr: linear warm-up from ~0 to 1, then cosine decay to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(
    factory: Callable[..., torch.optim.Optimizer],
    module: nn.Module,
    weight_decay: float,
    layer_decay: float | None = None,
    no_decay_bias_norm: bool = True,
) -> torch.optim.Optimizer:
    """``factory(params=groups)``, then every group's lr multiplied by its ``lr_scale`` (kept in the group, so the
    schedule below multiplies ``initial_lr`` = the scaled lr)."""
    if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"optim.layer_decay must be in (0, 1] or null, got {layer_decay}")
    groups = [
        g for g in parameter_groups(module, weight_decay, layer_decay, no_decay_bias_norm) if g["params"]
    ]
    optimizer = factory(params=groups)
    for g in optimizer.param_groups:
        g["lr"] = g["lr"] * g["lr_scale"]
    return optimizer
