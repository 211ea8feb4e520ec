"""Reading the small JSON records that describe files (feature stores, whitenings): one place for the checks and
the error messages that name the file."""

from __future__ import annotations

import json
from pathlib import Path


def read_versioned_json(path: Path, what: str, fmt: str, version: int, kind: str) -> dict:
    """The JSON object in ``path``, which must carry ``format == fmt`` and ``version == version``.

    ``what`` names the thing in the unreadable-file error (e.g. ``"feature store"``), ``kind`` in the
    wrong-format error (e.g. ``"store"``)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} {path} cannot be read: {e}") from e
    if not isinstance(info, dict) or info.get("format") != fmt or info.get("version") != version:
        found = (
            f"{info.get('format')} v{info.get('version')}" if isinstance(info, dict) else type(info).__name__
        )
        raise ValueError(f"{path} is not a {fmt} v{version} {kind}: {found}")
    return info
