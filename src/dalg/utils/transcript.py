"""A transcript of the console: everything written to stdout and stderr also goes to a file in the run folder.

Colours and cursor codes are removed; progress-bar redraws (rich's live display, tqdm's carriage returns) are left
out, the tables and messages printed meanwhile are kept. The terminal sees exactly what it saw before.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

_CSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\x1b[()][A-Za-z0-9]")
_REDRAW = re.compile(r"\x1b\[\d*[AK]|\x1b\[\?25[lh]")  # cursor up / erase line / cursor hide: a live frame
# a progress line: bar characters and an n/m counter (table borders have the bars, never the counter)
_PROGRESS = re.compile(r"[━╸╺].*\d+/\d+|\d+%\|")


def clean(text: str, live: bool) -> str:
    """``text`` without terminal codes; in a live frame, progress-bar lines are dropped."""
    plain = _CSI.sub("", text)
    if "\r" in plain:  # a line rewritten in place keeps its last version
        plain = "\n".join(line.rsplit("\r", 1)[-1] for line in plain.split("\n"))
    if live or "\r" in text:
        plain = "\n".join(ln for ln in plain.split("\n") if not _PROGRESS.search(ln))
        plain = plain.strip("\n") + "\n" if plain.strip() else ""
    return plain


class _Tee:
    """A text stream that writes to ``stream`` and, cleaned, to ``log``; everything else is ``stream``'s."""

    def __init__(self, stream: IO[str], log: IO[str]):
        self._stream = stream
        self._log = log

    def write(self, text: str) -> int:
        n = self._stream.write(text)
        if not self._log.closed:
            out = clean(text, live=bool(_REDRAW.search(text)))
            if out:
                self._log.write(out)
                self._log.flush()
        return n

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str):  # isatty, fileno, encoding...: the terminal's, so output is unchanged
        return getattr(self._stream, name)


@contextmanager
def transcript(path: str | os.PathLike) -> Iterator[Path]:
    """Append stdout and stderr to ``path`` while the block runs (the file is created with its folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old_out, old_err = sys.stdout, sys.stderr
    with open(path, "a", encoding="utf-8") as log:
        sys.stdout, sys.stderr = _Tee(old_out, log), _Tee(old_err, log)
        try:
            yield path
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout, sys.stderr = old_out, old_err
