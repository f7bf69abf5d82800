"""`check_dataset` finds each kind of problem, and none in clean data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dataset_builders import GEOMETRY_3D, make_nnunet_3d, make_nnunet_rgb_2d
from medseg.data import open_dataset
from medseg.data.check import check_dataset
from medseg.io import Geometry, Image, load, save

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _problems(root: Path) -> list[tuple[str, str, str]]:
    report = check_dataset(open_dataset(root))
    return [(p.case, p.path.name, p.problem) for p in report.problems]


def test_clean_datasets_have_no_problems(tmp_path: Path) -> None:
    report = check_dataset(open_dataset(make_nnunet_3d(tmp_path / "d3")))
    assert report.ok and report.cases == 3 and report.dimensions[3] == 3
    assert set(report.label_voxels) == {0, 1, 2}
    assert check_dataset(open_dataset(make_nnunet_rgb_2d(tmp_path / "d2"))).ok  # RGB file = 3 channels


def test_each_problem_is_reported(tmp_path: Path) -> None:
    root = make_nnunet_3d(tmp_path / "bad", cases=6)
    images, labels = root / "imagesTr", root / "labelsTr"
    # case 0: geometry differs (origin moved)
    lab = load(labels / "case_000.nii.gz")
    moved = Geometry(GEOMETRY_3D.spacing, (0.0, 0.0, 0.0), GEOMETRY_3D.direction)
    save(Image(lab.array, moved), labels / "case_000.nii.gz", protect=())
    # case 1: undeclared label value
    arr = lab.array.copy()
    arr[0, 0, 0] = 7
    save(Image(arr, GEOMETRY_3D), labels / "case_001.nii.gz")
    # case 2: NaN in the image
    img = load(images / "case_002_0000.nii.gz").array.copy()
    img[1, 1, 1] = np.nan
    save(Image(img, GEOMETRY_3D), images / "case_002_0000.nii.gz")
    # case 3: constant image
    save(Image(np.zeros(img.shape, np.float32), GEOMETRY_3D), images / "case_003_0000.nii.gz")
    # case 4: truncated label file
    data = (labels / "case_004.nii.gz").read_bytes()
    (labels / "case_004.nii.gz").write_bytes(data[: len(data) // 2])
    # case 5: label missing; and a label file without image
    shutil.move(labels / "case_005.nii.gz", labels / "case_999.nii.gz")
    info = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**info, "numTraining": 7}))
    problems = _problems(root)
    text = {case: problem for case, _, problem in problems}
    assert "geometry differs" in text["case_000"] and "origin" in text["case_000"]
    assert "[7] are not declared" in text["case_001"]
    assert "NaN" in text["case_002"]
    assert "empty" in text["case_003"]
    assert "case_004" in text
    assert "no label file" in text["case_005"]
    assert text["case_999.nii.gz"] == "label file has no image"
    assert "numTraining is 7 but 6" in text["-"]


def test_shape_and_channel_mismatch(tmp_path: Path) -> None:
    root = make_nnunet_rgb_2d(tmp_path / "rgb")
    save(Image(np.zeros((20, 25), np.uint8)), root / "labelsTr" / "img0.png")
    info = json.loads((root / "dataset.json").read_text())
    info["channel_names"] = {"0": "grey"}
    (root / "dataset.json").write_text(json.dumps(info))
    problems = _problems(root)
    assert any("shape (20, 25) differs" in p for _, _, p in problems)
    assert any("3 channels but dataset.json declares 1" in p for _, _, p in problems)


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["Hippocampus", "JSRT", "WBC", "BUSI", "ISBI-EM", "DRIVE", "MoNuSeg", "Kvasir-SEG"])
def test_shared_datasets_are_clean(name: str) -> None:
    root = SHARED_DATA / name
    if not root.is_dir():
        pytest.skip(f"{root} is absent (real datasets live in ../shared/data)")
    report = check_dataset(open_dataset(root))
    assert report.ok, report.problems[:5]


def test_channel_gaps_duplicates_and_wrong_endings(tmp_path: Path) -> None:
    root = make_nnunet_3d(tmp_path / "ch", cases=2)
    images = root / "imagesTr"
    shutil.copy(images / "case_000_0000.nii.gz", images / "case_000_0002.nii.gz")
    shutil.copy(images / "case_001_0000.nii.gz", images / "case_001_0000.nrrd")
    problems = _problems(root)
    text = " | ".join(p for _, _, p in problems)
    assert "_0000, _0002; they must run from _0000 up" in text
    assert "does not end with dataset.json's file_ending '.nii.gz'" in text
