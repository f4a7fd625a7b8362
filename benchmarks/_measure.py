"""Measurement helpers that the benchmarks share: call timing, peak memory, the machine.

Peak memory on a CPU is peak RSS above a baseline, read in a fresh worker process that a
benchmark script runs as ``script --worker SPEC`` (see :func:`measure_memory`).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from simexplain._files import atomic_write

MIB = 1024.0 * 1024.0


def time_call(run: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of ``run`` takes (CUDA events on a GPU, wall clock on a CPU)."""
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        out = run()
        stop.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(stop) / 1000.0
    else:
        t0 = time.perf_counter()
        out = run()
        seconds = time.perf_counter() - t0
    del out
    return seconds


def cuda_peak(run: Callable[[], Any], cleanup: Callable[[], None]) -> float:
    """Peak device memory above the allocation before the call, MiB."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    cleanup()
    return peak / MIB


def status_kib(field: str) -> Optional[int]:
    """A ``/proc/self/status`` field in KiB (e.g. ``VmRSS``), or None where there is none."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) if m else None


def maxrss_kib() -> int:
    """This process's largest RSS so far, KiB (Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def release_freed_memory() -> None:
    """Give the memory this process has freed back to the kernel (glibc's ``malloc_trim``),
    also under :func:`retain_freed_memory`."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_high_water_mark() -> bool:
    """Reset the RSS high-water mark (Linux >= 4.0); True when ru_maxrss followed."""
    release_freed_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    rss = status_kib("VmRSS")
    return rss is not None and maxrss_kib() <= rss * 1.02 + 1024


def measure_memory(script: Path, spec: dict, timeout: float) -> dict:
    """Run ``script --worker SPEC`` in a fresh process and return the dict it prints.

    The worker prints one line ``RESULT {json}``; a timeout or a failed worker gives
    ``{"error": ...}``.
    """
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "131072")
    env["OMP_NUM_THREADS"] = str(spec["threads"])
    cmd = [sys.executable, str(Path(script).resolve()), "--worker", json.dumps(spec)]
    if os.path.exists("/bin/sh"):
        # Linux keeps the largest RSS a process had across exec, so a child exec'd straight
        # from this (large) process would start with our ru_maxrss. A small shell that forks
        # the worker (it cannot exec it: a command follows) gives it a fresh count.
        cmd = ["/bin/sh", "-c", '"$@"; exit $?', "sh", *cmd]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"worker exited {proc.returncode}: {' | '.join(tail)}"}


def mem_available_mib() -> Optional[float]:
    """``MemAvailable`` of ``/proc/meminfo`` in MiB, or None."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    m = re.search(r"^MemAvailable:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) / 1024.0 if m else None


def median(xs: list) -> Optional[float]:
    """The median of the values that are not None, or None when there are none."""
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    """``num / den``, or None when either is missing or ``den`` is not positive."""
    if num is None or den is None or den <= 0:
        return None
    return num / den


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def cpu_name() -> str:
    """The CPU's model name, as the benchmarks' headers print it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def interleaved(names: list[str], repeats: int, time_one: Callable[[str], float],
                warm_up: bool = True) -> dict[str, list[float]]:
    """``time_one(name)`` for each of ``names``, ``repeats`` times, the order rotated every
    repetition so that drift and background load hit every name alike; one untimed call of
    each first (``warm_up``)."""
    if warm_up:
        for name in names:
            time_one(name)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(time_one(name))
    return times


def interleaved_times(runs: dict[str, Callable[[], Any]], repeats: int,
                      device: torch.device = torch.device("cpu"), warm_up: bool = True,
                      after: Optional[Callable[[], None]] = None) -> dict[str, list[float]]:
    """:func:`interleaved` seconds of each of ``runs`` in this process, ``after()`` after
    every call."""

    def time_one(name: str) -> float:
        seconds = time_call(runs[name], device)
        if after is not None:
            after()
        return seconds

    return interleaved(list(runs), repeats, time_one, warm_up)


def retain_freed_memory() -> bool:
    """Make glibc keep what this process frees for its next allocations: no ``mmap`` for
    large blocks, no trimming of the heap (``mallopt``; True where it took).

    By default glibc gives large freed blocks back to the kernel, and the next call's
    tensors fault their pages in again, zeroed: on this benchmark's 2-core machine that
    was half of a ResNet-50 forward over 24 images in a fresh process (690,000 minor faults,
    1.9 s of system time in a 2.6 s call; 1.4 s with this). How much of that a timed call
    pays depends on what the process allocated before, so timings compare the variants'
    work only once every variant runs on memory the process already holds.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, -1))
