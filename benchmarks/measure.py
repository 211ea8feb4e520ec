"""Measurement helpers shared by the benchmarks: clocks, interleaved medians, matmul peak, memory, machine facts."""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil
import torch


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device | str = "cpu", min_seconds: float = 0.0) -> float:
    """Wall seconds of one call (the GPU queue is drained before and after).

    With ``min_seconds`` the call is repeated back to back until that much time has passed and the mean per
    call is returned (timeit-style): a millisecond function timed once is dominated by timer and cache noise.
    """
    sync(device)
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        sync(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return elapsed / calls


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def interleaved(
    fns: dict[str, Callable[[], Any]],
    rounds: int,
    device: torch.device | str = "cpu",
    between: Callable[[int], None] | None = None,
    min_seconds: float = 0.0,
) -> dict[str, list[float]]:
    """Time every function once per round in the order A, B, C, A, B, C, ... (fair under a shared, noisy CPU).

    ``min_seconds``: each sample repeats its function for at least that long (see ``timed``)."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        if between is not None:
            between(r)
        for name, fn in fns.items():
            out[name].append(timed(fn, device, min_seconds))
    return out


def matmul_gflops(
    n: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    min_seconds: float = 1.0,
    shape: tuple[int, int, int] | None = None,
) -> float:
    """Dense matmul GFLOP/s (2 m k n FLOPs per product): (n x n) @ (n x n), or (m x k) @ (k x n) for ``shape``.

    Products are repeated for at least ``min_seconds`` and the total is timed, so that on a shared machine the
    figure sees the same contention as the multi-second extraction it is compared with (a few short products
    would catch the idle gaps and overstate the peak).
    """
    m, k, nn_ = shape if shape is not None else (n, n, n)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(k, nn_, generator=g).to(device=device, dtype=dtype)
    with torch.inference_mode():
        torch.mm(a, b)
        sync(device)
        reps, t0 = 0, time.perf_counter()
        while True:
            torch.mm(a, b)
            reps += 1
            if reps % 4 == 0:
                sync(device)
                if time.perf_counter() - t0 >= min_seconds:
                    break
        elapsed = time.perf_counter() - t0
    return 2 * m * k * nn_ * reps / elapsed / 1e9


class PeakRSS:
    """Peak resident memory of this process, sampled in a background thread while the block runs."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def process_peak_rss_bytes() -> int:
    """Peak resident memory of this process since it started (its own program, not its parent's).

    ``/proc/self/status`` VmHWM belongs to the current address space, so it starts afresh at exec.
    ``getrusage().ru_maxrss`` is only the fallback: Linux carries it across fork + exec, so a benchmark started
    by run_all.py after the extraction section reported run_all's 6.3 GB instead of its own 1.1 GB.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not on this platform
        return []


def machine_facts(device: torch.device) -> dict[str, Any]:
    from dalg.inference import cpu_has_fast_bf16

    facts: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_fast_bf16": cpu_has_fast_bf16(),
        "device": str(device),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    facts["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts
