"""Wall time and peak memory of a child process, for the benchmarks that run medseg's commands end to end."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def run_measured(command: list[str]) -> tuple[float, float, int]:
    """(peak GB, wall s, exit status) of ``command``. The peak is the child's own ``VmHWM`` (``/proc/PID/status``,
    read every 20 ms until it exits): ``wait4``'s ``ru_maxrss`` would also count this process's own peak, which
    Linux carries into a child that Python starts by vfork and exec. The child's stderr is printed if it fails."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while process.poll() is None:
        try:
            status_lines = Path(f"/proc/{process.pid}/status").read_text().splitlines()
        except OSError:  # it has just exited
            break
        peak = max([peak] + [int(line.split()[1]) for line in status_lines if line.startswith("VmHWM:")])
        time.sleep(0.02)
    _, stderr = process.communicate()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        print(stderr.decode(), file=sys.stderr)
    return peak / 1e6, seconds, process.returncode
