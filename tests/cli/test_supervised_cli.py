"""``medseg plan`` / ``train`` / ``predict`` as a user runs them, and their bad inputs (one line, exit 2,
nothing written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import assert_one_error_line as _one_error_line
from cli_helpers import run_cli as _run
from dataset_builders import make_nnunet_2d_shapes, make_nnunet_3d
from medseg.io import Image, load, save


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset, model folder): planned, the plan edited for a fast run, trained for two epochs."""
    root = tmp_path_factory.mktemp("cli")
    dataset = make_nnunet_2d_shapes(root / "Shapes", cases=6)
    assert _run("plan", dataset, "-o", root / "plan").exit_code == 0
    plan_path = root / "plan" / "plan.json"
    plan = json.loads(plan_path.read_text())
    plan["training"].update(iterations_per_epoch=10, batch_size=4, val_cases_per_epoch=2, learning_rate=3e-3)
    plan_path.write_text(json.dumps(plan))
    result = _run("train", dataset, "--plan", plan_path, "-o", root / "model", "--epochs", "3")
    assert result.exit_code == 0, result.output
    assert "trained 3 epochs" in result.stdout
    validation = json.loads((root / "model" / "split.json").read_text())["val"]
    assert sorted(p.name for p in (root / "model" / "validation").iterdir()) == sorted(f"{n}.png" for n in validation)
    return dataset, root / "model"


def test_plan_train_predict_evaluate(trained: tuple[Path, Path], tmp_path: Path) -> None:
    dataset, model = trained
    result = _run("predict", model, dataset / "imagesTr", "-o", tmp_path / "pred", "--mirror", "--save-probabilities")
    assert result.exit_code == 0, result.output
    outputs = sorted(p.name for p in (tmp_path / "pred").glob("*.png"))
    assert outputs == sorted(p.name.replace("_0000", "") for p in (dataset / "imagesTr").iterdir())
    probabilities = np.load(tmp_path / "pred" / "probabilities" / "case_000.npz")["probabilities"]
    assert probabilities.shape == (3, 32, 40)
    assert np.allclose(probabilities.astype(np.float32).sum(0), 1, atol=1e-2)
    scored = _run("evaluate", tmp_path / "pred", dataset / "labelsTr", "-o", tmp_path / "eval")
    assert scored.exit_code == 0, scored.output
    assert (tmp_path / "eval" / "metrics.csv").is_file()


def test_predict_keeps_geometry_and_format_of_a_resampled_input(trained: tuple[Path, Path], tmp_path: Path) -> None:
    _, model = trained
    image = load(next((trained[0] / "imagesTr").iterdir()))
    from medseg.io import Geometry

    placed = Image(image.array.astype(np.float32), Geometry((0.5, 0.7), (3.0, -2.0), (1.0, 0.0, 0.0, 1.0)))
    save(placed, tmp_path / "x.nii.gz")
    assert _run("predict", model, tmp_path / "x.nii.gz", "-o", tmp_path / "out").exit_code == 0
    label = load(tmp_path / "out" / "x.nii.gz")
    assert label.shape == placed.shape and label.geometry.matches(placed.geometry)


def test_bad_inputs_one_line_exit_2_nothing_written(trained: tuple[Path, Path], tmp_path: Path) -> None:
    dataset, model = trained
    out = tmp_path / "out"
    volume = make_nnunet_3d(tmp_path / "vol", cases=1) / "imagesTr" / "case_000_0000.nii.gz"
    _one_error_line(_run("predict", model, volume, "-o", out), "3D image", "2D images", str(volume))
    rgb = tmp_path / "rgb.png"
    save(Image(np.zeros((20, 20, 3), np.uint8), channels=3), rgb)
    _one_error_line(_run("predict", model, rgb, "-o", out), "3 channel(s)")
    assert not out.exists()

    broken = tmp_path / "broken_model"
    shutil.copytree(model, broken)
    (broken / "model.pt").write_bytes(b"not a checkpoint")
    _one_error_line(_run("predict", broken, rgb, "-o", out), "cannot read checkpoint", "model.pt")
    torch.save({"weight": torch.zeros(3)}, broken / "model.pt")
    _one_error_line(_run("predict", broken, rgb, "-o", out), "does not fit", "unet")
    assert not out.exists()

    bad_dataset = tmp_path / "bad"
    shutil.copytree(dataset, bad_dataset)
    (bad_dataset / "labelsTr" / "case_000.png").unlink()
    save(Image(np.full((32, 40), 7, np.uint8)), bad_dataset / "labelsTr" / "case_001.png")
    _one_error_line(_run("train", bad_dataset, "-o", tmp_path / "m"), "medseg dataset check", str(bad_dataset))
    _one_error_line(_run("plan", bad_dataset, "-o", tmp_path / "p"), "medseg dataset check")
    _one_error_line(_run("train", dataset, "-o", tmp_path / "m", "--memory-gb", "0.001"), "memory")
    _one_error_line(_run("train", dataset, "-o", model), "--resume")
    assert not (tmp_path / "m").exists() and not (tmp_path / "p").exists()


def test_train_refuses_a_model_other_than_the_plans(trained: tuple[Path, Path], tmp_path: Path) -> None:
    dataset, model = trained
    result = _run("train", dataset, "--plan", model / "plan.json", "--model", "vnet", "-o", tmp_path / "m")
    _one_error_line(result, "plan is for model 'unet'")


def test_more_bad_inputs_write_nothing(trained: tuple[Path, Path], tmp_path: Path) -> None:
    dataset, model = trained
    plan = json.loads((model / "plan.json").read_text())
    edits = {
        "lr.json": {**plan, "training": {**plan["training"], "learning_rate": "fast"}},
        "ranges.json": {**plan, "training": {**plan["training"], "scale_range": [1.25, 0.85]}},
        "labels.json": {**plan, "labels": {"background": 0, "disc": "1", "bar": 2}},
        "name.json": {**plan, "network": {**plan["network"], "name": "resnet"}},
        "width.json": {**plan, "network": {**plan["network"], "base_features": 0}},
        "kernels.json": {**plan, "network": {**plan["network"], "kernel_sizes": plan["network"]["kernel_sizes"][:-1]}},
        "renamed.json": {**plan, "labels": {"background": 0, "blob": 1, "bar": 2}},
    }
    for name, content in edits.items():
        (tmp_path / name).write_text(json.dumps(content))
        result = _run("train", dataset, "--plan", tmp_path / name, "-o", tmp_path / "m", "--epochs", "1")
        _one_error_line(result)
        assert not (tmp_path / "m").exists(), name
    volumes = make_nnunet_3d(tmp_path / "vol", cases=5)
    _one_error_line(_run("train", volumes, "--plan", model / "plan.json", "-o", tmp_path / "m"), "2D images", "3D")
    (tmp_path / "file").write_text("x")
    _one_error_line(_run("train", dataset, "-o", tmp_path / "file"), "is a file")
    _one_error_line(_run("plan", dataset, "-o", tmp_path / "file"), "is a file")
    _one_error_line(_run("train", dataset, "-o", dataset / "runs"), "inside the dataset")
    assert not (dataset / "runs").exists() and not (tmp_path / "m").exists()


def test_resume_with_a_broken_checkpoint_changes_nothing(trained: tuple[Path, Path], tmp_path: Path) -> None:
    dataset, model = trained
    run = tmp_path / "run"
    shutil.copytree(model, run)
    (run / "checkpoint.pt").write_bytes(b"truncated")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    _one_error_line(_run("train", dataset, "-o", run, "--resume", "--epochs", "9"), "cannot read checkpoint")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_predict_into_the_input_folder_refuses_before_writing(trained: tuple[Path, Path], tmp_path: Path) -> None:
    dataset, model = trained
    folder = tmp_path / "inputs"
    folder.mkdir()
    shutil.copy(dataset / "imagesTr" / "case_000_0000.png", folder / "case_000_0000.png")
    shutil.copy(dataset / "imagesTr" / "case_001_0000.png", folder / "case_001.png")  # its output name is itself
    _one_error_line(_run("predict", model, folder, "-o", folder), "output folder holds the inputs")
    assert sorted(p.name for p in folder.iterdir()) == ["case_000_0000.png", "case_001.png"]


def test_predict_writes_a_dicom_seg_per_dicom_series(trained: tuple[Path, Path], tmp_path: Path) -> None:
    from fixtures import write_dicom_series

    dataset, model = trained
    inputs = tmp_path / "inputs"  # two one-slice series of the model's 2D size (rows 32, columns 40)
    first = write_dicom_series(inputs / "ct_a", n_slices=1, rows=32, cols=40, write_order=[0])
    write_dicom_series(inputs / "ct_b", n_slices=1, rows=32, cols=40, write_order=[0], seed=3)
    result = _run("predict", model, inputs, "-o", tmp_path / "pred", "--output-format", "dicom-seg")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["ct_a.dcm", "ct_b.dcm"]
    seg, image = load(tmp_path / "pred" / "ct_a.dcm"), load(first.folder)
    assert seg.shape == image.shape == (32, 40)
    assert seg.geometry.matches(image.geometry), seg.geometry.describe_difference(image.geometry)
    assert seg.meta["segment_names"] == {1: "disc", 2: "bar"}  # the model's labels
    assert seg.meta["referenced_series_instance_uid"] == first.series_uid
    # auto keeps NIfTI for DICOM input; nifti writes .nii.gz for a PNG too
    assert _run("predict", model, first.folder, "-o", tmp_path / "auto").exit_code == 0
    assert [p.name for p in (tmp_path / "auto").iterdir()] == ["ct_a.nii.gz"]
    png = dataset / "imagesTr" / "case_000_0000.png"
    assert _run("predict", model, png, "-o", tmp_path / "nifti", "--output-format", "nifti").exit_code == 0
    assert [p.name for p in (tmp_path / "nifti").iterdir()] == ["case_000.nii.gz"]


def test_predict_dicom_seg_of_a_non_dicom_input_is_refused_before_any_work(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    dataset, _ = trained
    png = dataset / "imagesTr" / "case_000_0000.png"
    out = tmp_path / "out"
    # the model folder does not exist: the input is refused before the model is read
    result = _run("predict", tmp_path / "no_model", png, "-o", out, "--output-format", "dicom-seg")
    _one_error_line(result, str(png), "DICOM-SEG output needs a DICOM input")
    result = _run("predict", tmp_path / "no_model", png, "-o", out, "--output-format", "dicom")
    _one_error_line(result, "unknown output format 'dicom'")
    assert not out.exists()


def test_genseg_and_backbone_refusals_are_one_line_and_write_nothing(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    """Issue 19's bad inputs: --num-labelled too large or (GenSeg) too small, empty labels, a 3D LiteMedSAM
    encoder, an unknown mode or backbone, a fine-tuned encoder without one."""
    dataset, model = trained
    out = tmp_path / "m"
    plan = ["--plan", model / "plan.json"]
    _one_error_line(_run("train", dataset, *plan, "-o", out, "--num-labelled", "99", "--genseg"), "--num-labelled")
    _one_error_line(_run("train", dataset, *plan, "-o", out, "--num-labelled", "2", "--genseg"), "at least 3")
    _one_error_line(_run("train", dataset, *plan, "-o", out, "--genseg", "--genseg-mode", "both"), "--genseg-mode")
    _one_error_line(_run("train", dataset, *plan, "-o", out, "--genseg-mode", "separate"), "add --genseg")
    _one_error_line(_run("train", dataset, *plan, "-o", out, "--backbone", "resnet"), "unknown backbone")
    _one_error_line(_run("train", dataset, *plan, "-o", out, "--fine-tune-encoder"), "--backbone litemedsam")
    volumes = make_nnunet_3d(tmp_path / "vol", cases=5)
    _one_error_line(_run("train", volumes, "-o", out, "--backbone", "litemedsam"), "2D U-Net")
    empty = tmp_path / "empty"
    shutil.copytree(dataset, empty)
    for label in (empty / "labelsTr").iterdir():
        save(load(label).with_array(np.zeros((32, 40), np.uint8)), label)
    _one_error_line(_run("train", empty, *plan, "-o", out, "--genseg", "--num-labelled", "3"), "empty", str(empty))
    assert not out.exists()


def test_a_genseg_run_from_the_command_line_predicts(trained: tuple[Path, Path], tmp_path: Path) -> None:
    dataset, model = trained
    result = _run(
        "train", dataset, "--plan", model / "plan.json", "-o", tmp_path / "g", "--num-labelled", "4", "--genseg",
        "--epochs", "2", "--no-predict-validation",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "g" / "genseg_pairs.png").is_file() and (tmp_path / "g" / "generator.pt").is_file()
    result = _run("predict", tmp_path / "g", dataset / "imagesTr", "-o", tmp_path / "pred")
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "pred").iterdir())) == 6
