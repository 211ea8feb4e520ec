"""Checkpoint files written atomically: a temporary file in the same folder, flushed to disk, then os.replace.

A run killed while saving leaves the previous ``last.ckpt`` whole (a reader sees either the old or the new file).
Remote paths (``s3://`` ...) go through Lightning's own fsspec transaction.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.utilities.cloud_io import get_filesystem
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.plugins.io import TorchCheckpointIO

from dalg.utils.atomic import atomic_replace


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_replace(lambda f: torch.save(obj, f), path)  # 0666 & ~umask, fsynced


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))

    def remove_checkpoint(self, path: _PATH) -> None:
        fs = get_filesystem(path)
        if fs.exists(path):
            fs.rm(path, recursive=True)
