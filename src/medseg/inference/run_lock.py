"""``OUT/.medseg.lock``: one run at a time writes into an output folder (a batch run, and a plain ``predict`` or
``incontext`` run, `medseg.inference.folders.predict_folder`).

The lock is a file created exclusively (``O_CREAT | O_EXCL``, atomic on local and NFS v3+ file systems) holding
``<pid>@<host>`` of its run, removed when the run ends. A run killed with ``kill -9`` leaves it behind; as for the
staging folders (`medseg.inference.folders.remove_stale_staging`), a lock of this machine whose process has ended
is stale, and so is one of another machine (a shared folder) left untouched for `STALE_AFTER_S`: the run holding
it touches it every `TOUCH_EVERY_S` seconds. A stale lock is taken over; a live one refuses the second run with
one line naming its owner. A lock file that is empty or does not hold ``<pid>@<host>`` is stale (taken over with
a ``medseg: note:``); a folder in its place is refused, named, for the user to remove.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medseg.errors import MedsegError, notice
from medseg.inference.folders import process_alive, process_owner

LOCK = ".medseg.lock"
TOUCH_EVERY_S = 60.0
STALE_AFTER_S = 600.0  # another machine's lock untouched this long: its run is gone
_HELD: set[Path] = set()  # locks this process holds (a lock naming this pid but not here: a reused pid's)


def check_unlocked(output: Path) -> None:
    """Refuse early (before loading a model) when a live run holds ``output``'s lock; `output_lock` takes it.

    Raises:
        MedsegError: another run is writing into ``output``.
    """
    holder = _live_holder(Path(os.path.abspath(output)) / LOCK)
    if holder is not None:
        raise _locked(output, holder)


@contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold ``output/.medseg.lock`` (``output`` exists) while the block runs; a stale one is taken over.

    Raises:
        MedsegError: another run holds the lock; the lock cannot be written.
    """
    path = Path(os.path.abspath(output)) / LOCK
    owner = process_owner()
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _live_holder(path)
            if holder is not None:
                raise _locked(output, holder) from None
            # Two runs that find the same stale lock at the same instant could both take it over; a lock is
            # for people starting a second run by mistake, not for a race of milliseconds.
            path.unlink(missing_ok=True)
            continue
        except OSError as error:
            raise MedsegError(f"cannot write the lock file here ({error.strerror})", output) from None
        with os.fdopen(fd, "w") as f:
            f.write(owner + "\n")
        break
    _HELD.add(path)
    stop = threading.Event()
    toucher = threading.Thread(target=_touch, args=(path, stop), daemon=True, name="medseg-lock")
    toucher.start()
    try:
        yield
    finally:
        stop.set()
        toucher.join()
        _HELD.discard(path)
        try:
            if path.read_text().strip() == owner:
                path.unlink()
        except OSError:
            pass


def _touch(path: Path, stop: threading.Event) -> None:
    while not stop.wait(TOUCH_EVERY_S):
        try:
            os.utime(path)
        except OSError:
            return


def _live_holder(path: Path) -> str | None:
    """The ``pid@host`` of the lock at ``path`` when its run is alive (None: no lock, or a stale one: also an
    empty or unparseable file, which no run of medseg leaves, taken over with a note).

    Raises:
        MedsegError: ``path`` is a folder.
    """
    if path.is_dir():
        raise MedsegError("is a folder, not a lock file: remove it", path)
    for wait in (0.5, 0.0):
        try:
            holder = path.read_text(errors="replace").strip()
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return None
        except OSError:
            return "unknown"
        if holder or age > 2.0 or not wait:
            break
        time.sleep(wait)  # just made by a run that has not written its name yet (it does so at once)
    if not re.fullmatch(r"\d+@[^\s@]+", holder):
        shown = repr(holder[:40]) if holder else "nothing"
        notice(f"holds {shown}, not the pid@host of a run: taken over as stale", path)
        return None
    pid_text, _, host = holder.partition("@")
    if host == process_owner().split("@", 1)[1] and pid_text.isdigit():
        alive = path in _HELD if int(pid_text) == os.getpid() else process_alive(int(pid_text))
        return holder if alive else None
    return holder if age < STALE_AFTER_S else None


def _locked(output: Path, holder: str) -> MedsegError:
    pid, _, host = holder.partition("@")
    who = f"process {pid} on {host}" if host else holder
    return MedsegError(
        f"another medseg run ({who}) is writing into this folder; wait for it to end or choose another -o "
        f"({LOCK} names it)",
        output,
    )
