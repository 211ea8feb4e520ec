"""Unreadable images counted across DataLoader worker processes.

Workers are separate processes, so a dict on the dataset is only that worker's view. Every process appends one
line per *new* failure to a shared append-only file (``O_APPEND`` writes of one short line land whole on a local
file system); the main process reads the file whenever it reports, so the count is a true total however many
workers ran and however often they were restarted. The file lives in the system temp dir and is removed with
the log object in the process that created it.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from dataclasses import dataclass, field

_IMAGE, _CLASS = "image", "class"


def _clean(text: str) -> str:
    return " ".join(str(text).split("\t")).replace("\n", " ")


class FailureLog:
    """Append-only record of unreadable images (path -> reason) and classes left without a readable image."""

    def __init__(self, path: str | os.PathLike | None = None):
        if path is None:
            fd, path = tempfile.mkstemp(prefix="dalg-unreadable-", suffix=".tsv")
            os.close(fd)
            self._finalizer = weakref.finalize(self, _remove, os.fspath(path), os.getpid())
        self.path = os.fspath(path)
        self._written: set[tuple[str, str]] = set()  # what this process already appended

    def __getstate__(self) -> dict:
        # workers get the path only; the finalizer (file owner) stays with the creating process
        return {"path": self.path, "_written": set()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def _append(self, kind: str, key: str, reason: str) -> bool:
        if (kind, key) in self._written:
            return False
        self._written.add((kind, key))
        line = f"{kind}\t{_clean(key)}\t{_clean(reason)[:300]}\n".encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        return True

    def record_image(self, path: str, reason: str) -> bool:
        """True the first time this process records ``path``."""
        return self._append(_IMAGE, path, reason)

    def record_class(self, name: str, reason: str) -> bool:
        return self._append(_CLASS, name, reason)

    def read(self) -> tuple[dict[str, str], dict[str, str]]:
        """``(images, classes)`` recorded by every process so far, first reason kept."""
        images: dict[str, str] = {}
        classes: dict[str, str] = {}
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    parts = line.rstrip("\n").split("\t")
                    if len(parts) != 3:
                        continue  # a line being written right now; read again at the next report
                    target = images if parts[0] == _IMAGE else classes
                    target.setdefault(parts[1], parts[2])
        except FileNotFoundError:
            pass
        return images, classes


def _remove(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # a forked worker exiting must not delete the main process's file
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


@dataclass
class FailureSummary:
    """What changed since the previous report, and the totals."""

    new_images: dict[str, str] = field(default_factory=dict)
    new_classes: dict[str, str] = field(default_factory=dict)
    total_images: int = 0
    total_classes: int = 0
    n_samples: int = 0

    def __bool__(self) -> bool:
        return bool(self.new_images or self.new_classes)

    def message(self, examples: int = 3, dropped: bool = False) -> str:
        """``dropped``: found by a pre-scan, so the files and empty classes were left out of the dataset (not
        replaced while training)."""
        lines = []
        if self.new_images:
            shown = "; ".join(f"{p} ({r})" for p, r in list(self.new_images.items())[:examples])
            fate = "dropped before training" if dropped else "each replaced by another image of its class"
            lines.append(
                f"{len(self.new_images)} unreadable or missing image(s) found "
                f"({self.total_images} of {self.n_samples} listed so far), {fate}; e.g. {shown}"
            )
        if self.new_classes:
            names = ", ".join(list(self.new_classes)[:20])
            more = f" and {len(self.new_classes) - 20} more" if len(self.new_classes) > 20 else ""
            fate = (
                "are left out (no label)"
                if dropped
                else "are not trained on (their batches take images of other classes)"
            )
            lines.append(
                f"{len(self.new_classes)} class(es) have no readable image at all and {fate}: {names}{more}"
            )
        return "\n".join(lines)
