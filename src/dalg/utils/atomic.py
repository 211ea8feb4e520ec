"""Atomic file writes: a unique temp file beside the target, flushed and fsynced, then ``os.replace``.

A crash or a kill leaves either the old file or the new one under the final name, never half of one, and
concurrent writers (DDP ranks, parallel jobs) never share a temp file. The file gets the permissions a plain
``open()`` would give (0666 minus the umask), not mkstemp's private 0600, so teammates sharing a cluster folder
can read checkpoints, configs and feature stores.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (``os.umask`` must set it to read it,
    and a file another thread creates in that moment would get the wrong mode)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        log.debug("no Umask line in /proc/self/status; reading the umask with os.umask")
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def mkstemp_shared(prefix: str, suffix: str, dir: str | os.PathLike) -> tuple[int, str]:
    """``tempfile.mkstemp`` whose file has the mode ``open()`` would give it (0666 & ~umask) instead of 0600."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=dir)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    except OSError as e:  # a file system without POSIX modes: the file stays private, and works
        log.warning("cannot set the permissions of %s (%s); it stays readable by its owner only", tmp, e)
    return fd, tmp


def atomic_replace(
    write: Callable[[IO], None], final: str | os.PathLike, mode: str = "wb", fsync: bool = True
) -> Path:
    """Write through ``write(fileobj)`` into a temp file beside ``final``, fsync, then move it into place.
    ``fsync=False`` for files that are cheap to redo (thumbnails), where hundreds of fsyncs would dominate."""
    with atomic_path(final) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    return Path(final)


@contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """A temp file's path beside ``final`` (mode 0666 & ~umask), for writers that need a file name (NumPy memory
    maps, libraries that open the file themselves): moved into place when the block ends, removed on an error."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp_shared(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    return atomic_replace(lambda f: f.write(text), path, mode="w")


def write_json_atomic(obj: Any, path: str | os.PathLike, indent: int = 2) -> Path:
    return write_text_atomic(json.dumps(obj, indent=indent, default=str) + "\n", path)
