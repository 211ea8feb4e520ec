"""Optimiser parameter groups (weight-decay split, layer-wise lr decay) and the warm-up + cosine lr schedule."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
from torch import nn

# transformer blocks of a timm ViT/DeiT (``...vit.blocks.<i>.``) and the layers before them
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBEDDING = ("patch_embed", "pos_embed", "cls_token", "reg_token", "dist_token")


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    # norms, biases, GeM's p, position embeddings and class tokens are not decayed (ViT/DeiT practice)
    return param.ndim <= 1 or name.endswith((".bias", "pos_embed", "cls_token", "reg_token", "dist_token", ".p"))


def backbone_depth(module: nn.Module) -> int:
    """Number of transformer blocks ``blocks.<i>`` in ``module`` (0 for a CNN)."""
    ids = {int(m.group(1)) for name, _ in module.named_parameters() if (m := _BLOCK.search(name))}
    return max(ids) + 1 if ids else 0


def layer_id(name: str, depth: int) -> int:
    """BEiT/MAE layer index: embeddings 0, block i -> i + 1, everything after the backbone (branches, fusion,
    descriptor, margin head) ``depth + 1``."""
    if m := _BLOCK.search(name):
        return int(m.group(1)) + 1
    if "backbone." in name and any(k in name for k in _EMBEDDING):
        return 0
    return depth + 1


def parameter_groups(module: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """Groups keyed by (decay?, layer); each group carries ``lr_scale`` = ``layer_decay ** (depth + 1 - layer)``
    (1 for every group when ``layer_decay`` is None or the model has no ``blocks.<i>``)."""
    depth = backbone_depth(module) if layer_decay is not None else 0
    groups: dict[tuple[bool, int], dict] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        skip = no_weight_decay(name, p)
        layer = layer_id(name, depth) if depth else 0
        scale = float(layer_decay ** (depth + 1 - layer)) if depth else 1.0
        g = groups.setdefault((skip, layer), {"params": [], "weight_decay": 0.0 if skip else weight_decay,
                                              "lr_scale": scale, "names": []})
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base lr: linear warm-up from ~0 to 1, then cosine decay to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(factory: Callable[..., torch.optim.Optimizer], module: nn.Module, weight_decay: float,
                    layer_decay: float | None = None) -> torch.optim.Optimizer:
    """``factory(params=groups)``, then every group's lr multiplied by its ``lr_scale`` (kept in the group, so the
    schedule below multiplies ``initial_lr`` = the scaled lr)."""
    if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"optim.layer_decay must be in (0, 1] or null, got {layer_decay}")
    groups = [g for g in parameter_groups(module, weight_decay, layer_decay) if g["params"]]
    optimizer = factory(params=groups)
    for g in optimizer.param_groups:
        g["lr"] = g["lr"] * g["lr_scale"]
    return optimizer
