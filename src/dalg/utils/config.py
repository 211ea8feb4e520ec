"""Hydra/OmegaConf helpers shared by the entry points: resolvers and saving the resolved config."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dalg.utils.atomic import write_text_atomic

REPO_ROOT = Path(__file__).resolve().parents[3]


def register_resolvers() -> None:
    """``${repo_root:}`` = the checkout's top folder, so default paths work from any working directory."""
    if not OmegaConf.has_resolver("repo_root"):
        OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT))


def save_config(cfg: DictConfig, directory: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the fully resolved config atomically (written once per run, beside checkpoints and logs)."""
    return write_text_atomic(OmegaConf.to_yaml(cfg, resolve=True), Path(directory) / name)


register_resolvers()
