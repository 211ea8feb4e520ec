"""Atomic file writes: a unique temp file beside the target, flushed and fsynced, then ``os.replace``.

A crash or a kill leaves either the old file or the new one under the final name, never half of one, and
concurrent writers (DDP ranks, parallel jobs) never share a temp file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_replace(write: Callable[[IO], None], final: str | os.PathLike, mode: str = "wb") -> Path:
    """Write through ``write(fileobj)`` into a temp file beside ``final``, fsync, then move it into place."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return final


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    return atomic_replace(lambda f: f.write(text), path, mode="w")


def write_json_atomic(obj: Any, path: str | os.PathLike, indent: int = 2) -> Path:
    return write_text_atomic(json.dumps(obj, indent=indent, default=str) + "\n", path)
