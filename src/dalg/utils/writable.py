"""Check output locations before the work that fills them, so a long run never ends in a failed write."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class OutputNotWritableError(OSError):
    """An output location that cannot be written; the message names the config key and the path."""


def check_writable_file(path: str | os.PathLike, key: str) -> Path:
    """Make sure ``path`` can be written later: its folder exists (created if needed) and accepts a new file,
    and ``path`` itself is not a folder or an unwritable file. ``key`` is the config key, for the message."""
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir():
        raise OutputNotWritableError(f"{key}={path} is a folder; give a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputNotWritableError(f"{key}={path} exists and is not writable")
    check_writable_dir(path.parent, key, what=f"the folder of {key}={path}")
    return path


def check_writable_dir(directory: str | os.PathLike, key: str, what: str | None = None) -> Path:
    """Create ``directory`` if needed and write (then remove) a probe file in it; raise naming ``key`` if not."""
    directory = Path(os.path.expanduser(str(directory)))
    what = what or f"{key}={directory}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # a real write, not os.access: read-only mounts, quotas and ACLs all show up here
        with tempfile.TemporaryFile(dir=directory, prefix=".dalg-write-check-"):
            pass
    except OSError as e:
        raise OutputNotWritableError(
            f"{what} cannot be written ({directory}: {e.strerror or e}); choose another "
            f"path before anything is computed"
        ) from e
    return directory
