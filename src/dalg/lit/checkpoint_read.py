"""Reading a training checkpoint without running code from it, with errors that name the file.

Checkpoints are what researchers download from each other, so every read goes through ``torch.load`` with
``weights_only=True``: tensors, containers, numbers and strings only. This repository's own checkpoints hold
nothing else (hyper-parameters are saved as plain containers, see ``train_pipeline.build_module``), so nothing
needs the full unpickler. A file that would need it is refused before any of its code could run.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

# what a Lightning checkpoint of dalg.lit.module.RetrievalModule holds
LIGHTNING_KEYS = ("state_dict", "hyper_parameters")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and why."""


def read_checkpoint(path: str | os.PathLike, lightning: bool = True) -> dict[str, Any]:
    """The checkpoint at ``path`` as a dict, read with ``weights_only=True``.

    ``lightning=True`` also requires a Lightning checkpoint of this repository (``state_dict`` and
    ``hyper_parameters.model_cfg``), so a plain state dict is refused with a hint instead of failing later.
    """
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message advises weights_only=False; keep only its reason ("... GLOBAL posix.system ...")
        found = re.search(r"[^\n:]*GLOBAL [\w.]+|Unsupported operand \d+", str(e))
        reason = found.group(0).strip() if found else str(e).strip().split(". ")[0][:200]
        if "GLOBAL" in reason:  # the safe unpickler stopped at a global it does not allow
            raise CheckpointError(
                f"checkpoint {path} was refused: it holds Python objects beyond tensors and plain "
                f"containers, and loading it could run code; nothing from it was run "
                f"({reason[:200]})"
            ) from e
        raise CheckpointError(
            f"checkpoint {path} is not a PyTorch checkpoint (random or damaged bytes, or a plain "
            f"pickle; {reason[:200]})"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, TypeError) as e:
        raise CheckpointError(
            f"checkpoint {path} cannot be read (truncated or damaged?): "
            f"{type(e).__name__}: {str(e).strip().split('. ')[0][:200]}"
        ) from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a dict")
    if lightning:
        check_lightning_checkpoint(ckpt, path)
    return ckpt


def check_lightning_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike) -> None:
    missing = [k for k in LIGHTNING_KEYS if k not in ckpt]
    if missing:
        tensors = ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values())
        what = "a plain state dict (weights only)" if tensors else f"a dict with keys {sorted(ckpt)[:8]}"
        raise CheckpointError(
            f"checkpoint {path} is {what}, not a training checkpoint of this repository "
            f"(missing {missing}; written by src/train.py). Backbone weights go in "
            f"model.backbone.checkpoint=<file> instead"
        )
    hp = ckpt["hyper_parameters"]
    if not isinstance(hp, dict) or not isinstance(hp.get("model_cfg"), dict):
        raise CheckpointError(
            f"checkpoint {path}: hyper_parameters.model_cfg (the model config) is missing, "
            f"so the network cannot be rebuilt"
        )
    if not isinstance(ckpt["state_dict"], dict):
        raise CheckpointError(
            f"checkpoint {path}: state_dict is a {type(ckpt['state_dict']).__name__}, not a dict"
        )


def checkpoint_step(path: str | os.PathLike) -> int:
    """The ``global_step`` a training checkpoint was saved at (safe read; errors name the file)."""
    ckpt = read_checkpoint(path)
    step = ckpt.get("global_step", 0)
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"checkpoint {path}: global_step {step!r} is not a step count")
    return step
