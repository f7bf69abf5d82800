"""The ``medseg`` command line as a user runs it: outputs, exit status 2 and one-line errors."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import assert_one_error_line as _one_error_line
from cli_helpers import run_cli as _run
from dataset_builders import make_nnunet_3d, make_nnunet_rgb_2d
from medseg.io import Image, load, save


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def test_help_is_fast_and_lists_commands() -> None:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "medseg.cli.main", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    assert time.perf_counter() - start < 3.0  # generous for a loaded CI machine; typically ~0.3 s
    for command in ("info", "evaluate", "dataset"):
        assert command in done.stdout


@pytest.mark.parametrize("args", [("-h",), ("train", "-h"), ("dataset", "-h"), ("dataset", "check", "-h")])
def test_short_help_option(args: tuple[str, ...]) -> None:
    result = _run(*args)
    assert result.exit_code == 0, result.output
    assert " ".join(["Usage: medseg", *args[:-1], "[OPTIONS]"]) in result.stdout


_DEVICE_COMMANDS = {
    "prompt": ("in.png", "--box", "1,2,30,40"),
    "finetune-prompt": ("dataset",),
    "train": ("dataset",),
    "train-incontext": ("dataset",),
    "train-matching-head": ("dataset",),
}


@pytest.mark.parametrize("command", sorted(_DEVICE_COMMANDS))
def test_unknown_device_is_one_line_before_any_work(tmp_path: Path, command: str) -> None:
    args = [tmp_path / a if a in ("in.png", "dataset") else a for a in _DEVICE_COMMANDS[command]]
    result = _run(command, *args, "-o", tmp_path / "out", "--device", "bogus")
    _one_error_line(result, "--device", "cpu, cuda", "'bogus'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device", ["cuda", "mps"])
@pytest.mark.parametrize("command", sorted(_DEVICE_COMMANDS))
def test_device_torch_cannot_see_is_one_line(tmp_path: Path, command: str, device: str) -> None:
    import torch

    if torch.cuda.is_available() if device == "cuda" else torch.backends.mps.is_available():
        pytest.skip(f"this machine has a {device} device")
    args = [tmp_path / a if a in ("in.png", "dataset") else a for a in _DEVICE_COMMANDS[command]]
    result = _run(command, *args, "-o", tmp_path / "out", "--device", device)
    _one_error_line(result, f"--device {device}", f"no {device.upper()} device")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["finetune-prompt", "train-incontext", "train-matching-head"])
def test_cpu_only_trainers_refuse_a_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    result = _run(command, tmp_path / "dataset", "-o", tmp_path / "out", "--device", "cuda")
    _one_error_line(result, f"{command} trains on the CPU only")
    assert not (tmp_path / "out").exists()


def test_info_prints_geometry_and_label_volumes(tmp_path: Path) -> None:
    root = make_nnunet_3d(tmp_path / "ds", cases=1)
    result = _run("info", root / "labelsTr" / "case_000.nii.gz")
    assert result.exit_code == 0, result.output
    assert "(0.8, 0.8, 2.5) mm" in result.output
    assert "LAS" in result.output  # x to the left, y flipped (anterior), z superior
    # label 1: 3*4*3 = 36 voxels of 0.8*0.8*2.5 = 1.6 mm^3 -> 0.0576 ml
    assert "0.058" in result.output and "36" in result.output and " a " in result.output


def test_info_on_rgb_png(tmp_path: Path) -> None:
    root = make_nnunet_rgb_2d(tmp_path / "rgb", cases=1)
    result = _run("info", root / "imagesTr" / "img0_0000.png")
    assert result.exit_code == 0 and "3 channels" in result.output


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("missing.nii.gz", None, "no such file"),
        ("empty.nii.gz", b"", "empty"),
        ("noise.png", b"not a png at all", "cannot read"),
        ("weird.xyz", b"123", "unknown file extension"),
    ],
)
def test_info_bad_files(tmp_path: Path, name: str, content: bytes | None, fragment: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    _one_error_line(_run("info", path), str(path), fragment)


def test_info_nan_and_4d(tmp_path: Path) -> None:
    """Issue 22: NaN voxels are counted without failing; a 4D file shows its frame count and one frame."""
    import SimpleITK as sitk

    nan = np.zeros((3, 4, 5), np.float32)
    nan[0, 0, 0] = np.nan
    save(Image(nan), tmp_path / "nan.nii.gz")
    result = _run("info", tmp_path / "nan.nii.gz")
    assert result.exit_code == 0, result.output
    assert "1 voxels (1 NaN, 0 inf" in result.stdout
    volumes = np.stack([np.full((3, 4, 5), t, np.float32) for t in range(2)])
    sitk.WriteImage(sitk.GetImageFromArray(volumes, isVector=False), str(tmp_path / "t.nii.gz"))
    result = _run("info", tmp_path / "t.nii.gz")
    assert result.exit_code == 0, result.output
    assert "2 (4D; frame 0 shown" in result.stdout and "max 0," in result.stdout
    result = _run("info", tmp_path / "t.nii.gz", "--frame", "1")
    assert result.exit_code == 0 and "min 1, max 1" in result.stdout, result.output
    _one_error_line(_run("info", tmp_path / "t.nii.gz", "--frame", "2"), "t.nii.gz", "out of range")
    # no counting from the end: -1 is refused, naming the frames there are
    _one_error_line(_run("info", tmp_path / "t.nii.gz", "--frame", "-1"), "t.nii.gz", "--frame -1", "numbered 0 to 1")


def test_dataset_check_clean_and_broken(tmp_path: Path) -> None:
    root = make_nnunet_3d(tmp_path / "ds", cases=2)
    ok = _run("dataset", "check", root)
    assert ok.exit_code == 0 and "no problems found" in ok.output
    label = load(root / "labelsTr" / "case_001.nii.gz")
    save(label.with_array(label.array * 3), root / "labelsTr" / "case_001.nii.gz")
    bad = _run("dataset", "check", root)
    _one_error_line(bad, str(root), "1 problems")
    assert "labelsTr/case_001.nii.gz" in bad.stdout and "declared" in bad.stdout
    _one_error_line(_run("dataset", "check", tmp_path / "nothing"), "no such dataset folder")


def test_evaluate_writes_outputs_and_leaves_inputs_alone(tmp_path: Path) -> None:
    root = make_nnunet_3d(tmp_path / "ds", cases=2)
    pred = tmp_path / "pred"
    for case in ("case_000", "case_001"):
        label = load(root / "labelsTr" / f"{case}.nii.gz")
        save(label.with_array(np.roll(label.array, 1, axis=2)), pred / f"{case}.nii.gz")
    before = _digest(tmp_path)
    result = _run("evaluate", pred, root / "labelsTr", "-o", tmp_path / "eval", "--tolerance-mm", "1")
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "eval").iterdir()} == {"metrics.csv", "summary.json", "evaluation.png"}
    assert " a " in result.output and " b " in result.output  # names from dataset.json
    after = _digest(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("eval")} == before


def test_evaluate_bad_inputs_write_nothing(tmp_path: Path) -> None:
    root = make_nnunet_3d(tmp_path / "ds", cases=2)
    labels = root / "labelsTr"
    out = tmp_path / "eval"
    _one_error_line(_run("evaluate", labels, labels, "-o", labels), "output folder is an input")
    _one_error_line(_run("evaluate", labels, labels, "-o", out, "--labels", "9"), "label 9 is not in")
    pred = tmp_path / "pred"
    save(Image(np.zeros((6, 12, 10), np.uint8)), pred / "case_000.nii.gz")
    _one_error_line(_run("evaluate", pred, labels, "-o", out), "no prediction for case 'case_001'")
    label = load(labels / "case_001.nii.gz")
    save(label.with_array(label.array * 4), pred / "case_001.nii.gz")
    _one_error_line(_run("evaluate", pred, labels, "-o", out), "case_000.nii.gz", "geometry differs")
    save(load(labels / "case_000.nii.gz").with_array(label.array), pred / "case_000.nii.gz")
    _one_error_line(_run("evaluate", pred, labels, "-o", out), "case_001.nii.gz", "[4, 8] are not in")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_evaluate_predicted_only_and_output_inside_input(tmp_path: Path) -> None:
    root = make_nnunet_3d(tmp_path / "ds", cases=3)
    labels = root / "labelsTr"
    pred = tmp_path / "pred"
    label = load(labels / "case_001.nii.gz")
    save(label, pred / "case_001.nii.gz")
    _one_error_line(_run("evaluate", pred, labels, "-o", tmp_path / "e"), "no prediction for case 'case_000'")
    result = _run("evaluate", pred, labels, "-o", tmp_path / "e", "--predicted-only")
    assert result.exit_code == 0, result.output
    assert "1 cases" in result.output
    _one_error_line(_run("evaluate", pred, labels, "-o", labels / "sub"), "inside the input folder")
    not_a_folder = pred / "case_001.nii.gz"
    _one_error_line(_run("evaluate", pred, labels, "-o", tmp_path / "e2", "--images", not_a_folder), "--images")


def test_info_and_evaluate_take_a_dicom_seg(tmp_path: Path) -> None:
    import json

    from fixtures import write_dicom_series
    from medseg.io import save_dicom_seg

    series = write_dicom_series(tmp_path / "ct", n_slices=4, rows=10, cols=12)
    image = load(series.folder)
    truth = np.zeros(image.shape, np.uint8)
    truth[1:3, 2:6, 3:8] = 1
    save(image.with_array(truth), tmp_path / "gt" / "ct.nii.gz")
    save_dicom_seg(image.with_array(truth), tmp_path / "pred" / "ct.dcm", series.folder, segment_names=["liver"])
    result = _run("info", tmp_path / "pred" / "ct.dcm")
    assert result.exit_code == 0, result.output
    assert "dicom-seg" in result.output and "(4, 10, 12)" in result.output and "SEG" in result.output
    assert "liver" in result.output and "(0.6, 0.7, 2.5) mm" in result.output
    result = _run("evaluate", tmp_path / "pred", tmp_path / "gt", "-o", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["cases"] == 1 and summary["labels"]["1"]["dice"]["mean"] == 1.0


def test_prompt_never_writes_into_its_input_series(tmp_path: Path) -> None:
    from fixtures import write_dicom_series

    series = write_dicom_series(tmp_path / "ct", n_slices=4, rows=10, cols=12)
    before = sorted(p.name for p in series.folder.iterdir())
    inside = _run("prompt", series.folder, "--box", "1,1,8,8", "--slice", "1", "-o", series.folder)
    _one_error_line(inside, "input DICOM series folder")
    a_slice = _run("prompt", series.folder, "--box", "1,1,8,8", "--slice", "1", "-o", series.files[0])
    _one_error_line(a_slice, "is a file without an extension")
    assert sorted(p.name for p in series.folder.iterdir()) == before


def test_prompt_refuses_a_volume_to_a_2d_raster_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medseg.inference.prompt_predictor import PromptPredictor

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(PromptPredictor, "from_checkpoint", no_model)
    volume = tmp_path / "ct.nii.gz"
    save(Image(np.zeros((4, 16, 16), np.int16)), volume)
    for name, fragment in (("out.png", "cannot write a 3D image as PNG"), ("out.jpg", "as JPEG (use .nii.gz)")):
        result = _run("prompt", volume, "--box3d", "2,2,0,10,10,3", "-o", tmp_path / name)
        _one_error_line(result, fragment)
        assert name in result.output and not (tmp_path / name).exists()


_INFO_PEAK = """
import contextlib, io, json, sys
import nibabel, numpy, SimpleITK, rich.table
import medseg.cli.info_cmd, medseg.io, medseg.preprocessing.statistics
from medseg.cli.main import app
def peak_mb():  # VmHWM: this process's own peak (ru_maxrss after a fork also counts the parent's)
    line = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
before = peak_mb()
with contextlib.redirect_stdout(io.StringIO()):
    app(["info", sys.argv[1]], standalone_mode=False)
print(json.dumps({"before_mb": before, "peak_mb": peak_mb()}))
"""


def test_info_peak_memory_within_the_voxel_budget(tmp_path: Path) -> None:
    """Issue 22: ``info`` on a float64 .nii.gz (8.4 million voxels) adds at most 24 bytes a voxel to the peak
    (read included), under the 32 of ``MEDSEG_MAX_VOXELS``'s budget; numpy's one-call statistics took 34."""
    import json
    import os

    import nibabel as nib

    from medseg.io.limits import BYTES_PER_VOXEL_BUDGET

    array = (np.arange(128 * 256 * 256, dtype=np.float64).reshape(128, 256, 256) % 1000.0) * 0.37 - 100.0
    array[0, 0, :3] = np.nan
    path = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    done = subprocess.run(
        [sys.executable, "-c", _INFO_PEAK, str(path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    per_voxel = (result["peak_mb"] - result["before_mb"]) * 2**20 / array.size
    print(f"info on {array.size} float64 voxels: {per_voxel:.1f} bytes a voxel at the peak")
    assert per_voxel < 24 < BYTES_PER_VOXEL_BUDGET, result
