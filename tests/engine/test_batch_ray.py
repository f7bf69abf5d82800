"""``medseg predict --ray`` on a local Ray (two CPUs, no dashboard, started once for the module): the same label maps
as without Ray, failed rows, and a Ray worker killed with SIGKILL mid-run whose cases are done anyway, once each."""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from batch_helpers import assert_same_label_maps, make_model
from cli_helpers import run_cli
from medseg.engine.batch import BatchOptions, predict_batch
from medseg.engine.manifest import Row
from medseg.inference.folders import cases_of

ray = pytest.importorskip("ray", reason="pip install 'medseg[ray]' for the Ray runner")


@pytest.fixture(scope="module")
def local_ray() -> Any:
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=96 << 20, log_to_driver=False)
    yield ray
    ray.shutdown()


def rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_ray_writes_what_the_plain_command_writes(local_ray: Any, tmp_path: Path) -> None:
    images, model_dir = make_model(tmp_path)
    assert run_cli("predict", model_dir, images, "-o", tmp_path / "plain").exit_code == 0
    (images / "broken.png").write_bytes(b"not a png")
    result = run_cli("predict", model_dir, images, "-o", tmp_path / "ray", "--ray", "--workers", "2")
    assert result.exit_code == 1, result.output
    assert_same_label_maps(tmp_path / "plain", tmp_path / "ray")
    statuses = {Path(r["path"]).name: r["status"] for r in rows(tmp_path / "ray")}
    assert statuses == {p.name: "failed" if p.name == "broken.png" else "done" for p in images.iterdir()}
    again = run_cli("predict", model_dir, images, "-o", tmp_path / "ray", "--ray", "--workers", "2")
    assert "6 done before" in again.stdout, again.output  # only the broken file is tried again


def _workers() -> list[int]:
    """Process ids of this machine's Ray Data actors of the batch runner (by their process title)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"_RayCases" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds Ray's worker processes in /proc")
def test_a_killed_worker_has_its_cases_done_again(local_ray: Any, tmp_path: Path) -> None:
    images, model_dir = make_model(tmp_path)
    for path in list(images.iterdir()):  # 24 cases: the workers are still busy when the first row arrives
        for copy in range(1, 4):
            (images / f"{path.name[:-9]}x{copy}_0000.png").write_bytes(path.read_bytes())
    killed: list[int] = []

    def kill_one(row: Row) -> None:
        if not killed and _workers():
            killed.append(_workers()[0])
            os.kill(killed[0], signal.SIGKILL)

    cases = cases_of(images)
    result = predict_batch(
        BatchOptions(str(model_dir)), cases, tmp_path / "ray", use_ray=True, workers=2, on_row=kill_one
    )
    assert killed, "no Ray worker was found to kill"
    assert (result.done, result.failed) == (24, 0)
    for copy in (tmp_path / "ray").glob("*x?.png"):  # a copy's label map is its original's
        assert copy.read_bytes() == (tmp_path / "ray" / f"{copy.name[:-6]}.png").read_bytes()
    assert not list((tmp_path / "ray").glob(".medseg-staging.*"))
    recorded = [r["path"] for r in rows(tmp_path / "ray")]
    assert sorted(recorded) == sorted({r for r in recorded}) and len(recorded) == 24
