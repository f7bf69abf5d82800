"""Process-wide settings that make PyTorch on CPU faster.

`tune_allocator`: glibc's malloc returns every large freed block (above a threshold that adapts up to
32 MB) to the operating system and maps it afresh at the next allocation, so each multi-megabyte
tensor of a forward pass is paid for again in page faults. On a 2-core machine this cost as much as
the arithmetic: `benchmarks/prompt.py --quick` spent 50 s of system time next to 180 s of user time,
and 1.3 s once freed memory stayed in the heap for reuse (embedding 0.99 -> 0.65 s per image, one
prompt 24 -> 19 ms). This is what preloading jemalloc or tcmalloc achieves, done with glibc's own
``mallopt`` (see ``man 3 mallopt``: M_MMAP_THRESHOLD, M_TRIM_THRESHOLD).

The cost is memory: up to ``trim_threshold`` bytes of freed heap stay resident instead of being
given back. Set ``MEDSEG_TUNE_MALLOC=0`` to keep the system's behaviour.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_tuned: bool | None = None


def tune_allocator(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Keep freed blocks below ``mmap_threshold`` bytes in the heap for reuse (glibc on Linux only).

    Applied once per process; later calls return the first call's outcome. Does nothing, and returns
    False, off glibc, when ``MEDSEG_TUNE_MALLOC=0``, or when the user set glibc's own
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` environment variables.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    chosen_by_user = any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
    if not sys.platform.startswith("linux") or os.environ.get("MEDSEG_TUNE_MALLOC") == "0" or chosen_by_user:
        return _tuned
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return _tuned
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    return _tuned


def limit_malloc_arenas(count: int = 1) -> bool:
    """Let at most ``count`` glibc malloc arenas serve all threads (glibc on Linux only; False elsewhere).

    A server answers from many threads, and glibc gives each its own arena: with `tune_allocator`'s
    retained heap, every arena would keep its own freed tensors, multiplying the resident memory. Call it
    before the threads start.
    """
    if not sys.platform.startswith("linux") or os.environ.get("MEDSEG_TUNE_MALLOC") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, count))


_MAX_THREADS = 1024


def choose_threads(environ: dict[str, str] | None = None) -> int | None:
    """Set PyTorch's CPU thread count from the cores that are free now, unless the user chose one.

    On a 2-core machine busy with other work, two threads of one forward pass wait on each other: one thread
    was several times faster there (`benchmarks/threads.py` measures it). So the count is the number of cores
    idle now (`free_cores`, rounded), at least 1. ``MEDSEG_THREADS=N`` chooses N (over
    ``OMP_NUM_THREADS``); otherwise a set ``OMP_NUM_THREADS`` (which torch itself reads) is left to act. Call
    before torch is imported: the choice is passed as ``OMP_NUM_THREADS``, as a user would set it.

    Returns:
        The count chosen, or None when the user's setting stands (or the load cannot be read).

    Raises:
        MedsegError: ``MEDSEG_THREADS`` is not a whole number from 1 to `_MAX_THREADS`.
    """
    env = os.environ if environ is None else environ
    chosen = env.get("MEDSEG_THREADS", "").strip()
    count: int | None
    if chosen:
        if not (chosen.isascii() and chosen.isdigit() and 0 < int(chosen) <= _MAX_THREADS):
            from medseg.errors import MedsegError

            raise MedsegError(f"MEDSEG_THREADS must be a whole number from 1 to {_MAX_THREADS}, not {chosen!r}")
        count = int(chosen)  # medseg's own setting wins over OMP_NUM_THREADS
    elif "OMP_NUM_THREADS" in env:
        return None
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        free = free_cores(cores)
        count = None if free is None else max(1, min(cores, round(free)))
    if count is not None:
        env["OMP_NUM_THREADS"] = str(count)
    return count


def free_cores(cores: int, window: float = 0.1) -> float | None:
    """How many of ``cores`` are idle now: the machine's idle share over ``window`` seconds (``/proc/stat``,
    Linux) times its CPUs, at most ``cores``; elsewhere ``cores`` minus the 1-minute load average (which lags: a
    process that just ended still counts); None when neither can be read."""
    try:
        first = _cpu_times()
        time.sleep(window)
        second = _cpu_times()
        idle, total = second[0] - first[0], second[1] - first[1]
        if total > 0:
            return min(float(cores), (os.cpu_count() or cores) * idle / total)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return cores - os.getloadavg()[0]
    except OSError:
        return None


def _cpu_times() -> tuple[int, int]:
    """(idle + iowait, all) jiffies of the machine's CPUs so far, from the first line of ``/proc/stat``."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    return fields[3] + fields[4], sum(fields)


DEVICES = ("cpu", "cuda", "mps")


def check_device(device: str, allow_auto: bool = False) -> str:
    """``device`` if this torch can run on it: ``cpu``, ``cuda`` or ``mps`` (and ``auto`` when ``allow_auto``).

    Raises:
        MedsegError: an unknown name, or cuda / mps asked for where torch sees none.
    """
    from medseg.errors import MedsegError

    known = ("auto", *DEVICES) if allow_auto else DEVICES
    if device not in known:
        raise MedsegError(f"--device must be {', '.join(known[:-1])} or {known[-1]}, not {device!r}")
    if device in ("auto", "cpu"):
        return device  # torch not imported: the check costs nothing
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise MedsegError("--device cuda asked for, but this torch build sees no CUDA device")
    if device == "mps" and not torch.backends.mps.is_available():
        raise MedsegError("--device mps asked for, but this machine has no MPS device (Apple silicon)")
    return device
