"""The watchdog of a local Ray started by a batch run (`medseg.engine.batch_ray`), on Linux:
``python -m medseg.engine.ray_watchdog DRIVER_PID``, its standard input a pipe from the driver.

When the driver is killed (``kill -9``, the OOM killer), Ray's fate sharing ends at once the processes the driver
started itself (GCS, raylet, ...), with SIGKILL; but the dashboard and runtime-env agents, which the raylet started,
see the raylet die without a SIGTERM and then spend 60 s trying to report it to the dead GCS before they exit.
The watchdog, in a session of its own, notes the driver's Ray processes and their descendants every few seconds;
when its standard input closes without the driver's ``done`` (the driver is gone), it ends those still running
(SIGTERM, then SIGKILL), each checked by its start time so that a reused process id is left alone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

DONE = b"done"
_LOOK_EVERY_S = 2.0


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent id, start time) of a live process (None: gone, or a zombie)."""
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in "ZX" else (int(fields[1]), fields[19])


def ray_processes(driver: int) -> dict[int, str]:
    """Process id -> start time of ``driver``'s children that run Ray (their command line names ray) and of all
    their descendants."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            parents.setdefault(stat[0], []).append(int(entry.name))
    found: dict[int, str] = {}
    todo = []
    for child in parents.get(driver, []):
        try:
            command = (Path("/proc") / str(child) / "cmdline").read_bytes()
        except OSError:
            continue
        if b"ray" in command and child != os.getpid():
            todo.append(child)
    while todo:
        pid = todo.pop()
        if (stat := _stat(pid)) is not None:
            found[pid] = stat[1]
            todo += parents.get(pid, [])
    return found


def end(processes: dict[int, str], grace_s: float = 1.0) -> None:
    """SIGTERM to the ``processes`` still running (same start time), then SIGKILL to those left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = [pid for pid, started in processes.items() if (stat := _stat(pid)) is not None and stat[1] == started]
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while left and time.monotonic() < deadline and any(_stat(pid) is not None for pid in left):
            time.sleep(0.1)


def main() -> None:
    driver = int(sys.argv[1])
    said: list[bytes] = []
    closed = threading.Event()

    def listen() -> None:
        said.append(sys.stdin.buffer.read())
        closed.set()

    threading.Thread(target=listen, daemon=True).start()
    seen: dict[int, str] = {}
    while True:
        seen.update(ray_processes(driver))
        if closed.wait(_LOOK_EVERY_S):
            break
    if DONE not in said[0]:
        end(seen)


if __name__ == "__main__":
    main()
