"""`medseg.inference.run_lock`: one batch run at a time in an output folder; a killed run's lock is taken over."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medseg.errors import MedsegError, MedsegNotice
from medseg.inference import run_lock
from medseg.inference.run_lock import LOCK, check_unlocked, output_lock

HOST = socket.gethostname().replace(".", "_")


def ended_pid() -> int:
    """The id of a process of this machine that has ended."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_live_run_keeps_a_second_out_and_its_lock_goes_at_the_end(tmp_path: Path) -> None:
    with output_lock(tmp_path):
        assert (tmp_path / LOCK).read_text().strip() == f"{os.getpid()}@{HOST}"
        with pytest.raises(MedsegError, match=rf"another medseg run \(process {os.getpid()} on {HOST}\)"):
            check_unlocked(tmp_path)
        with pytest.raises(MedsegError, match="is writing into this folder"), output_lock(tmp_path):
            pass
    assert not (tmp_path / LOCK).exists()
    (tmp_path / LOCK).write_text(f"{os.getppid()}@{HOST}\n")  # pytest's parent: alive
    with pytest.raises(MedsegError, match=f"process {os.getppid()}"):
        check_unlocked(tmp_path)


def test_a_killed_runs_lock_is_taken_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / LOCK).write_text(f"{ended_pid()}@{HOST}\n")
    check_unlocked(tmp_path)
    with output_lock(tmp_path):
        assert (tmp_path / LOCK).read_text().strip() == f"{os.getpid()}@{HOST}"
    (tmp_path / LOCK).write_text(f"{os.getpid()}@{HOST}\n")  # this pid, not held here: a reused pid's leftover
    check_unlocked(tmp_path)
    (tmp_path / LOCK).write_text("123@another_host\n")  # another machine's: stale only when left untouched
    with pytest.raises(MedsegError, match="process 123 on another_host"):
        check_unlocked(tmp_path)
    old = time.time() - run_lock.STALE_AFTER_S - 1
    os.utime(tmp_path / LOCK, (old, old))
    check_unlocked(tmp_path)
    monkeypatch.setattr(run_lock, "TOUCH_EVERY_S", 0.05)  # a run touches its lock while it goes on
    with output_lock(tmp_path):
        os.utime(tmp_path / LOCK, (old, old))
        time.sleep(0.5)
        assert time.time() - (tmp_path / LOCK).stat().st_mtime < 5


@pytest.mark.parametrize("text", ["", "garbage\n", "12ab@host\n", "\x00\x01"])
def test_an_empty_or_garbled_lock_is_taken_over_with_a_note(tmp_path: Path, text: str) -> None:
    """Issue: a lock file that was empty or garbage was never taken over ("another medseg run (...)" forever)."""
    (tmp_path / LOCK).write_text(text)
    old = time.time() - 10
    os.utime(tmp_path / LOCK, (old, old))
    with pytest.warns(MedsegNotice, match=r"\.medseg\.lock: holds .*not the pid@host of a run: taken over"):
        check_unlocked(tmp_path)
    with pytest.warns(MedsegNotice), output_lock(tmp_path):
        assert (tmp_path / LOCK).read_text().strip() == f"{os.getpid()}@{HOST}"
    assert not (tmp_path / LOCK).exists()


def test_a_folder_in_the_locks_place_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / LOCK).mkdir()
    for attempt in (lambda: check_unlocked(tmp_path), lambda: output_lock(tmp_path).__enter__()):
        with pytest.raises(MedsegError, match=r"\.medseg\.lock: is a folder, not a lock file: remove it"):
            attempt()
    assert (tmp_path / LOCK).is_dir()
