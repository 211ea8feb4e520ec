"""Optimiser parameter groups and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    # norms, biases, GeM's p, position embeddings and class tokens are not decayed (ViT/DeiT practice)
    return param.ndim <= 1 or name.endswith((".bias", "pos_embed", "cls_token", "reg_token", ".p"))


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    decay, skip = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (skip if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": skip, "weight_decay": 0.0}]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base lr: linear warm-up from ~0 to 1, then cosine decay to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(factory: Callable[..., torch.optim.Optimizer], module: nn.Module,
                    weight_decay: float) -> torch.optim.Optimizer:
    groups: Iterable[dict] = parameter_groups(module, weight_decay)
    return factory(params=[g for g in groups if g["params"]])
