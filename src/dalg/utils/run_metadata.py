"""What a run saves beside its checkpoints so it can be traced: git commit, versions, and a fingerprint of the
dataset file lists (the training CSV and every evaluation set's ground-truth pickle)."""

from __future__ import annotations

import hashlib
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dalg.utils.config import REPO_ROOT


def git_state(repo: Path = REPO_ROOT) -> dict[str, Any]:
    """``{"commit", "dirty", "branch"}``; ``commit`` is None outside a git checkout (e.g. an installed wheel)."""

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(
                ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": commit,
        "dirty": bool(status) if status is not None else None,
        "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
    }


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dataset_fingerprint(files: Mapping[str, Path | None]) -> dict[str, Any]:
    """sha256 of each list file and one combined digest over ``name:sha`` in name order (missing files: None)."""
    per_file = {
        name: (file_sha256(p) if p is not None and Path(p).is_file() else None) for name, p in files.items()
    }
    combined = hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(per_file.items())).encode()).hexdigest()
    return {
        "files": {k: {"path": str(files[k]) if files[k] else None, "sha256": v} for k, v in per_file.items()},
        "sha256": combined,
    }


def datamodule_list_files(datamodule: Any) -> dict[str, Path | None]:
    """The files that define a RetrievalDataModule's data: ``train`` (the GLDv2 CSV; None for class folders) and
    ``eval/<set>`` (what each evaluation-set spec names: a gnd pickle, a queries CSV)."""
    files: dict[str, Path | None] = {}
    if getattr(datamodule, "root", None):
        gldv2 = getattr(datamodule, "layout", "gldv2") == "gldv2"
        files["train"] = (
            Path(os.path.expanduser(str(datamodule.root))) / datamodule.csv_name if gldv2 else None
        )
    for key, spec in getattr(datamodule, "eval_specs", {}).items():
        for path in spec.definition_files().values():  # dalg.data.eval_spec.EvalSetSpec
            files[f"eval/{spec.name or key}"] = path
    return files


def run_metadata(datamodule: Any, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    import pytorch_lightning
    import timm
    import torch

    train_set = getattr(datamodule, "train_set", None)
    return {
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "host": socket.gethostname(),
        "git": git_state(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "pytorch_lightning": pytorch_lightning.__version__,
            "timm": timm.__version__,
        },
        "data": {
            **dataset_fingerprint(datamodule_list_files(datamodule)),
            "train_images": len(train_set) if train_set is not None else None,
            "train_classes": getattr(train_set, "num_classes", None),
        },
        **dict(extra or {}),
    }


def flatten(d: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in d.items():
        if isinstance(v, Mapping):
            yield from flatten(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v
