"""CPU thread budget and allocator tuning: how many intra-op threads training uses on a
shared machine, and glibc malloc settings for large tensors."""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from imgcls.engine.callbacks import Callback, TrainState

def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        return os.cpu_count() or 1


def _cpu_sample() -> tuple[int, int, float, float] | None:
    """(idle + iowait jiffies, total jiffies) of all cores from /proc/stat (without guest
    time), this process's CPU seconds and the monotonic clock; None where unreadable."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        t = os.times()
        return vals[3] + vals[4], sum(vals[:8]), t.user + t.system, time.monotonic()
    except (OSError, ValueError, IndexError):
        return None


# taken when the training modules load: the start-up probe measures from here to the session's
# start (0.5-2 s of imports and data loading) instead of sleeping 0.25 s of its own
PROCESS_SAMPLE = _cpu_sample()


def idle_cores(interval: float = 0.25, since: tuple[int, int, float, float] | None = None,
               max_age: float = 30.0) -> float | None:
    """How many cores other processes leave idle (Linux /proc/stat), or None where that
    cannot be read: measured from ``since`` (a :func:`_cpu_sample`) when that lies between
    ``interval`` and ``max_age`` seconds back, else over the next ``interval`` seconds. This
    process's own CPU time counts as idle: those are the cores its threads are about to use."""
    age = time.monotonic() - since[3] if since is not None else -1.0
    first = since if interval <= age <= max_age else None
    if first is None:
        first = _cpu_sample()
        time.sleep(interval)
    last = _cpu_sample()
    if first is None or last is None or last[1] <= first[1]:
        return None
    own = (last[2] - first[2]) * os.sysconf("SC_CLK_TCK")  # seconds -> jiffies
    idle = min(last[0] - first[0] + own, last[1] - first[1])
    return idle / (last[1] - first[1]) * (os.cpu_count() or 1)


def configure_threads(threads: int | None, decode_workers: int = 0, probe: bool = True,
                      since: tuple[int, int, float, float] | None = None) -> int:
    """Set torch's intra-op threads; returns the count.

    Default: the cores this process may use (at most OMP_NUM_THREADS when set; minus
    decode workers running alongside),
    lowered to the cores actually idle right now. OpenMP threads that must share a busy
    core spin against each other: measured on the shared 2-core machine with other jobs
    running, the reference CNN trained at 342 img/s with 2 threads and 1,257 with 1.
    ``probe=False`` (deterministic runs) skips the idle-core probe: the count then depends
    only on the process's cores and OMP_NUM_THREADS, never on what else runs. ``since``: an
    earlier :func:`_cpu_sample` to probe from (:func:`idle_cores`).
    """
    if threads is None:
        # an explicit OMP_NUM_THREADS (set by users, or by the DDP launcher per process) caps it
        omp = os.environ.get("OMP_NUM_THREADS", "")
        cap = int(omp) if omp.isdigit() and int(omp) > 0 else usable_cores()
        threads = max(1, min(cap, usable_cores()) - decode_workers)
        free = idle_cores(since=since) if probe else None
        if free is not None:
            threads = max(1, min(threads, int(free + 0.5)))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
_allocator_tuned = False


def tune_cpu_allocator(mmap_threshold: int = 256 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Let glibc's malloc serve large blocks from its heap instead of a fresh ``mmap`` each
    time. Without this, every tensor over 32 MiB (a float batch of 64 images at 224 px is
    38.5 MiB; airbench's activations at batch 512 are 60-130 MiB) is mapped and unmapped on
    every step, and its pages are faulted in and zeroed again each time: normalising that
    batch took 33 ms, 13 ms with this (bench/data_throughput.py; airbench's training step
    ~5% faster). It is what PyTorch's CPU tuning guide gets by preloading jemalloc or
    tcmalloc, done with two ``mallopt`` calls. Process-wide, once; glibc only (returns False
    elsewhere); ``IMGCLS_MALLOC_TUNING=0`` turns it off. Freed memory up to
    ``trim_threshold`` stays with the process for reuse instead of going back to the OS."""
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if os.environ.get("IMGCLS_MALLOC_TUNING", "1") == "0":
        return False
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                    trim_threshold) == 1
    except (OSError, AttributeError):
        return False
    _allocator_tuned = ok
    return ok


class AdaptiveThreads(Callback):
    """Re-check the idle cores at each epoch start (from the second on) and resize torch's
    thread pool to them: other jobs on a shared machine come and go during a long run
    (seen here: a CIFAR-10 run started beside other jobs kept 1 thread after the machine
    went idle). Between epochs this process computes nothing, so the idle count is what
    the others leave. Skipped for short epochs, where the 0.25 s probe would show."""

    def __init__(self, min_epoch_s: float = 10.0):
        self.min_epoch_s = min_epoch_s
        self.last_epoch_s = 0.0

    def on_epoch_end(self, state: TrainState, model: nn.Module) -> None:
        self.last_epoch_s = state.metrics.get("epoch_time", 0.0)

    def on_epoch_start(self, state: TrainState) -> None:
        if state.epoch > 1 and self.last_epoch_s >= self.min_epoch_s:
            configure_threads(None)
