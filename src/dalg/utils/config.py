"""Hydra/OmegaConf helpers shared by the entry points: resolvers and saving the resolved config."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dalg.utils.atomic import write_text_atomic

REPO_ROOT = Path(__file__).resolve().parents[3]


def cuda_bf16(if_bf16: str, otherwise: str) -> str:
    """``if_bf16`` on a CUDA GPU with native bfloat16 (Ampere or newer), else ``otherwise``: the recipe trainer's
    precision (conf/trainer/auto.yaml), so one config trains in bf16 on a GPU and in float32 on a CPU."""
    import torch

    native = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return if_bf16 if native else otherwise


def register_resolvers() -> None:
    """``${repo_root:}`` = the checkout's top folder, so default paths work from any working directory;
    ``${cuda_bf16:a,b}`` = ``cuda_bf16(a, b)``."""
    if not OmegaConf.has_resolver("repo_root"):
        OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT))
    if not OmegaConf.has_resolver("cuda_bf16"):
        OmegaConf.register_new_resolver("cuda_bf16", cuda_bf16)


def save_config(cfg: DictConfig, directory: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the fully resolved config atomically (written once per run, beside checkpoints and logs)."""
    return write_text_atomic(OmegaConf.to_yaml(cfg, resolve=True), Path(directory) / name)


register_resolvers()
