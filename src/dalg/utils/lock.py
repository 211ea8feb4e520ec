"""An exclusive lock on a file or folder that two processes must not write at once (a feature store, a run folder).

``flock`` on ``<path>``: the kernel drops the lock when its holder exits, however it exits (SIGKILL included), so a
lock left by a dead process never blocks the next run; the file only carries the holder's pid, host and start time
for the message a refused second writer gets. ``flock`` works across processes on one machine and, on Linux, on
NFS (it is emulated with POSIX locks there); it is not a lock between machines on file systems without lock
support.

The file is removed on release. A process that opened it just before could then lock an unlinked file while a
third one creates and locks a new one; acquiring therefore re-checks that the locked file is still the one at
``path`` and retries otherwise.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class LockHeldError(RuntimeError):
    """Another live process holds the lock; ``holder`` is what it wrote into the lock file (pid, host, start)."""

    def __init__(self, message: str, path: Path, holder: str):
        super().__init__(message)
        self.path = path
        self.holder = holder


def _read_holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode("utf-8", "replace").strip()


def _acquire(path: Path, what: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd) or "pid unknown (it has not written its pid yet)"
            os.close(fd)
            raise LockHeldError(
                f"{what} is in use by another process ({holder}; lock file {path}). Wait for it to finish or "
                f"stop it; a lock whose holder has died is released by the system and does not block.",
                path,
                holder,
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # released and removed by its holder between our open and our flock
            same = False
        if same:
            return fd
        os.close(fd)


@contextmanager
def exclusive_lock(path: str | os.PathLike, what: str | None = None) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` (created if needed) for the ``with`` block; raise :class:`LockHeldError`
    at once, naming the holder's pid, if another process holds it. ``what`` names the locked thing in the error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, what or str(path))
    try:
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {stamp}\n".encode(), 0)
        yield path
    finally:
        try:
            path.unlink(missing_ok=True)  # still held: nobody can take it between the unlink and the unlock
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)  # explicit: forked workers share the open file and would keep it
            os.close(fd)
