"""Reading dataset layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dataset_builders import GEOMETRY_3D, make_folder_pairs, make_nnunet_3d, make_nnunet_rgb_2d
from medseg.data import find_dataset_json, open_dataset
from medseg.data.cases import load_case
from medseg.errors import MedsegError
from medseg.io import Geometry, Image, load, save


def test_nnunet_layout_groups_channels_and_reads_dataset_json(tmp_path: Path) -> None:
    root = make_nnunet_3d(tmp_path / "Dataset001_Toy")
    # a second channel for one case, to check grouping by the _XXXX suffix
    (root / "imagesTr" / "case_000_0001.nii.gz").write_bytes((root / "imagesTr" / "case_000_0000.nii.gz").read_bytes())
    ds = open_dataset(root)
    assert ds.layout == "nnunet"
    assert [c.name for c in ds.cases] == ["case_000", "case_001", "case_002"]
    assert [p.name for p in ds.cases[0].images] == ["case_000_0000.nii.gz", "case_000_0001.nii.gz"]
    assert ds.cases[1].label == root / "labelsTr" / "case_001.nii.gz"
    assert ds.label_names() == {0: "background", 1: "a", 2: "b"}
    assert ds.foreground_labels() == [1, 2]
    assert ds.modality == "CT" and ds.declared_cases == 3


def test_dataset_json_with_a_byte_order_mark(tmp_path: Path) -> None:
    """Issue 22: a dataset.json saved by an editor that writes a UTF-8 BOM reads as without one."""
    root = make_nnunet_3d(tmp_path / "Dataset001_Toy", cases=1)
    (root / "dataset.json").write_bytes(b"\xef\xbb\xbf" + (root / "dataset.json").read_bytes())
    assert open_dataset(root).label_names() == {0: "background", 1: "a", 2: "b"}


def test_missing_label_and_orphan_label(tmp_path: Path) -> None:
    root = make_nnunet_rgb_2d(tmp_path / "rgb")
    (root / "labelsTr" / "img0.png").rename(root / "labelsTr" / "ghost.png")
    ds = open_dataset(root)
    assert ds.cases[0].label is None
    assert [p.name for p in ds.orphan_labels] == ["ghost.png"]


def test_folder_pairs_match_mask_suffixes(tmp_path: Path) -> None:
    ds = open_dataset(make_folder_pairs(tmp_path / "pairs", mask_suffix="_mask"))
    assert ds.layout == "folders"
    assert [(c.name, c.label.name if c.label else None) for c in ds.cases] == [
        ("s0", "s0_mask.png"),
        ("s1", "s1_mask.png"),
    ]
    assert ds.labels == {}


def test_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(MedsegError, match="not a dataset"):
        open_dataset(tmp_path)
    with pytest.raises(MedsegError, match="no such dataset folder"):
        open_dataset(tmp_path / "missing")


def test_invalid_dataset_json(tmp_path: Path) -> None:
    root = make_nnunet_rgb_2d(tmp_path / "rgb")
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(MedsegError, match=r"invalid dataset\.json"):
        open_dataset(root)
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "x": [1, 2]}}))
    with pytest.raises(MedsegError, match="not a non-negative integer"):
        open_dataset(root)


def test_image_without_channel_suffix_is_rejected(tmp_path: Path) -> None:
    root = make_nnunet_rgb_2d(tmp_path / "rgb")
    (root / "imagesTr" / "img0_0000.png").rename(root / "imagesTr" / "img0.png")
    with pytest.raises(MedsegError, match="_0000"):
        open_dataset(root)


def test_find_dataset_json(tmp_path: Path) -> None:
    root = make_nnunet_rgb_2d(tmp_path / "rgb")
    assert find_dataset_json(root / "labelsTr") == root / "dataset.json"
    assert find_dataset_json(tmp_path) is None


def test_a_label_map_placed_elsewhere_than_its_image_is_refused(tmp_path: Path) -> None:
    root = make_nnunet_3d(tmp_path / "Dataset001_Toy", cases=2)
    label_path = root / "labelsTr" / "case_001.nii.gz"
    shifted = Geometry(GEOMETRY_3D.spacing, (10.0, 20.0, 5.0), GEOMETRY_3D.direction)  # 20 mm along x
    save(Image(load(label_path).array, shifted), label_path)
    ds = open_dataset(root)
    load_case(ds.cases[0])  # the untouched case reads
    with pytest.raises(MedsegError, match="geometry differs from the image's: origin") as error:
        load_case(ds.cases[1])
    assert error.value.path == label_path
