"""dalg.utils.lock: a second holder is refused with the first one's pid; a dead holder's lock does not block."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dalg.utils.lock import LockHeldError, exclusive_lock

from .conftest import REPO

_HOLD = (
    "import sys; from dalg.utils.lock import exclusive_lock\n"
    "with exclusive_lock(sys.argv[1]):\n    print('locked', flush=True); sys.stdin.read()\n"
)


def hold_lock(path: Path) -> subprocess.Popen:
    """A separate process that holds ``path`` until its stdin closes (or it is killed)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(REPO / "src")},
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_holder_is_refused_naming_the_pid_and_a_dead_holder_does_not_block(tmp_path):
    path = tmp_path / "out.lock"
    proc = hold_lock(path)
    try:
        with pytest.raises(
            LockHeldError, match=rf"the store is in use by another process \(pid {proc.pid} on "
        ):
            with exclusive_lock(path, "the store"):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)  # dies holding it: the kernel releases the flock, the file stays
        proc.wait()
    assert path.exists() and f"pid {proc.pid}" in path.read_text()
    with exclusive_lock(path):
        assert path.read_text().startswith(f"pid {__import__('os').getpid()} ")
    assert not path.exists()  # removed on release


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    with exclusive_lock(tmp_path / "a.lock"):
        with pytest.raises(LockHeldError):
            with exclusive_lock(tmp_path / "a.lock"):
                pass
    with exclusive_lock(tmp_path / "a.lock"):  # released after the block
        pass
