"""`medseg.runtime`: freed blocks reused, not mapped afresh (fewer page faults); threads follow free cores."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

# Allocates, touches and frees a 64 MB array twenty times; prints tune_allocator's result and the minor
# page faults of the loop (untuned glibc maps every block above 32 MB afresh and faults it in again each
# round: ~500 faults per round with numpy's huge pages, ~16k without).
_SCRIPT = """
import resource, sys
import numpy as np
from medseg.runtime import tune_allocator
tuned = tune_allocator() if sys.argv[1] == "tune" else False
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    block = np.ones(16 << 20, np.float32)
    del block
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(mode: str, **env: str) -> tuple[bool, int]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "MEDSEG_TUNE_MALLOC"}
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, check=True, env=environment | env
    )
    tuned, faults = done.stdout.split()
    return tuned == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_tuned_allocator_reuses_freed_blocks() -> None:
    tuned, tuned_faults = _run("tune")
    _, plain_faults = _run("plain")
    assert tuned
    assert plain_faults > 20 * 100  # every round
    assert tuned_faults < plain_faults / 4  # the first round only


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
@pytest.mark.parametrize("env", [{"MEDSEG_TUNE_MALLOC": "0"}, {"MALLOC_MMAP_THRESHOLD_": "1000000"}])
def test_the_user_can_keep_the_system_allocator(env: dict[str, str]) -> None:
    tuned, _ = _run("tune", **env)
    assert not tuned


def test_thread_count_follows_the_free_cores_unless_the_user_chose_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from medseg import runtime
    from medseg.errors import MedsegError
    from medseg.runtime import choose_threads

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(runtime, "free_cores", lambda cores: 0.2)  # every core busy
    env: dict[str, str] = {}
    assert choose_threads(env) == 1 and env["OMP_NUM_THREADS"] == "1"
    monkeypatch.setattr(runtime, "free_cores", lambda cores: cores - 0.1)  # idle
    env = {}
    assert choose_threads(env) == cores and env["OMP_NUM_THREADS"] == str(cores)
    env = {"OMP_NUM_THREADS": "3"}
    assert choose_threads(env) is None and env == {"OMP_NUM_THREADS": "3"}  # the user's setting stands
    env = {"MEDSEG_THREADS": "2", "OMP_NUM_THREADS": "1"}
    assert choose_threads(env) == 2 and env["OMP_NUM_THREADS"] == "2"  # medseg's own setting wins
    for bad in ("two", "\u00b2", "0", "-1", "99999"):  # superscript two: str.isdigit() but not int()
        with pytest.raises(MedsegError, match=f"MEDSEG_THREADS must be a whole number from 1 to 1024, not {bad!r}"):
            choose_threads({"MEDSEG_THREADS": bad, "OMP_NUM_THREADS": "1"})


def test_a_bad_thread_setting_is_one_line_and_exit_2() -> None:
    env = {**os.environ, "MEDSEG_THREADS": "0"}
    env.pop("OMP_NUM_THREADS", None)
    done = subprocess.run([sys.executable, "-m", "medseg", "info", "-h"], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "medseg: error: MEDSEG_THREADS must be a whole number from 1 to 1024, not '0'"
    ]


def test_free_cores_sees_a_busy_core_at_once() -> None:
    from medseg.runtime import free_cores

    cores = len(os.sched_getaffinity(0))
    idle = free_cores(cores)
    assert idle is not None and 0 <= idle <= cores
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = free_cores(cores, window=0.5)
    finally:
        burner.kill()
        burner.wait()
    assert busy is not None and busy <= cores - 0.5  # one spinning process takes about a core
