"""The local Ray that ``medseg predict --ray`` starts itself, in a ``medseg`` process of its own (the module's one Ray):
no notice about Ray's token authentication on stderr, every input in the manifest from the start, a second run into
the same folder refused while the first goes on, no Ray process left soon after ``kill -9`` of the driver, and the
next run taking over the killed run's lock and resuming it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batch_helpers import make_model, manifest_rows
from cli_helpers import assert_one_error_line, run_cli

pytest.importorskip("ray", reason="pip install 'medseg[ray]' for the Ray runner")
SOURCE = Path(__file__).parents[2] / "src"


def children() -> dict[int, list[int]]:
    """Parent process id -> its children's, of this machine's live processes (zombies left out)."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if fields[0] != "Z":
                    tree.setdefault(int(fields[1]), []).append(int(entry.name))
        except OSError:
            continue
    return tree


def descendants(pid: int) -> set[int]:
    tree, found, todo = children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    return {pid for tree in children().values() for pid in tree} & pids


def wait_for(condition: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.5)
    return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="follows the driver's processes in /proc")
def test_a_killed_driver_leaves_no_ray_behind_and_the_next_run_resumes(tmp_path: Path) -> None:
    images, model_dir = make_model(tmp_path)
    for path in list(images.iterdir()):  # 24 cases on one worker: the run is still going when it is killed
        for copy in range(1, 4):
            (images / f"{path.name[:-9]}x{copy}_0000.png").write_bytes(path.read_bytes())
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # as a user's shell: Ray's defaults
    env["PYTHONPATH"] = os.pathsep.join([str(SOURCE), *filter(None, [os.environ.get("PYTHONPATH")])])
    command = [sys.executable, "-m", "medseg", "predict", str(model_dir), str(images), "-o", str(out)]
    with open(tmp_path / "stderr", "wb") as stderr:
        driver = subprocess.Popen(
            [*command, "--ray", "--workers", "1"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
            cwd=tmp_path,
            start_new_session=True,  # its own process group: removed at the end whatever happens
        )
    try:
        started = wait_for(
            lambda: (out / "manifest.csv").exists() and "done" in (out / "manifest.csv").read_text(), 180
        )
        assert started, (tmp_path / "stderr").read_text()
        assert len(manifest_rows(out)) == 24  # every input, pending until done
        assert_one_error_line(run_cli(*command[3:], "--batch"), "another medseg run", f"process {driver.pid} ")
        ray_processes = descendants(driver.pid)
        assert len(ray_processes) >= 4, ray_processes  # GCS, raylet, agents, the worker...
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        assert wait_for(lambda: not alive(ray_processes), 30), f"left running: {alive(ray_processes)}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
    assert "Token authentication" not in (tmp_path / "stderr").read_text()
    resumed = run_cli(*command[3:], "--batch")
    assert resumed.exit_code == 0 and "done before" in resumed.stdout, resumed.output
    assert {r["status"] for r in manifest_rows(out)} == {"done"} and len(list(out.glob("*.png"))) == 24
    assert not (out / ".medseg.lock").exists()
