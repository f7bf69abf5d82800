"""`medseg.server.workspace.Workspace` on small synthetic folders (no model): what it lists, the task's labels,
finished label maps written atomically in the image's format and geometry, drafts, and the nnU-Net export."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

import fixtures as fx
from medseg.data import open_dataset
from medseg.errors import MedsegError
from medseg.io import Geometry, Image, load, save
from medseg.server.workspace import UnknownImage, Workspace, _task_modality

SIDE = 16
VOLUME = (4, 10, 12)
GEOMETRY_3D = Geometry((0.8, 0.7, 2.5), (-20.0, 15.5, 40.0), (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def flat(value: int = 200) -> Image:
    """A 16 x 16 grey image with a bright 6 x 6 square at rows 4:10, columns 5:11."""
    pixels = np.full((SIDE, SIDE), 20, np.uint8)
    pixels[4:10, 5:11] = value
    return Image(pixels)


def square_labels(value: int = 1) -> np.ndarray:
    labels = np.zeros((SIDE, SIDE), np.uint8)
    labels[4:10, 5:11] = value
    return labels


def volume() -> Image:
    array = np.zeros(VOLUME, np.float32)
    array[1:3, 2:6, 3:8] = 100.0
    return Image(array, GEOMETRY_3D)


def make_flat_workspace(root: Path) -> Path:
    """Images directly in the folder: two PNGs, a NIfTI volume, a two-channel case, plus things never listed."""
    save(flat(), root / "b.png")
    save(flat(150), root / "a.png")
    save(volume(), root / "vol.nii.gz")
    save(flat(), root / "mr_0000.png")
    save(flat(90), root / "mr_0001.png")
    (root / "notes.txt").write_text("not an image")
    save(Image(square_labels()), root / "labelsTr" / "a.png")  # a label map: never an image
    save(flat(), root / ".medseg" / "drafts" / "stray.png")  # medseg's state: never an image
    (root / "empty").mkdir()  # an empty folder: not a series
    outside = tmp_outside(root)
    os.symlink(save(flat(), outside / "secret.png"), root / "linked.png")  # resolves outside: not listed
    os.symlink(outside, root / "linked_folder")
    return root


def tmp_outside(root: Path) -> Path:
    outside = root.parent / f"{root.name}-outside"
    outside.mkdir(parents=True, exist_ok=True)
    return outside


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return Workspace(make_flat_workspace(tmp_path / "ws"))


def no_temporary_files(folder: Path) -> bool:
    return not [p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith((".tmp", ".part"))]


# ---- listing -----------------------------------------------------------------------------------------------
def test_a_flat_folder_lists_its_images_by_case_name(workspace: Workspace) -> None:
    entries = workspace.entries()
    assert list(entries) == ["a", "b", "mr", "vol"]
    root = workspace.root
    assert entries["mr"].files == (root / "mr_0000.png", root / "mr_0001.png")
    assert entries["vol"].files == (root / "vol.nii.gz",)
    assert workspace.image("mr").channels == 2 and workspace.image("vol").shape == VOLUME
    assert workspace.labels == {"background": 0, "foreground": 1}


def test_new_images_appear(workspace: Workspace) -> None:
    assert "c" not in workspace.entries()
    save(flat(), workspace.root / "c.png")
    assert "c" in workspace.entries()


def test_an_nnunet_layout_lists_imagesTr(tmp_path: Path) -> None:
    root = tmp_path / "Dataset001"
    save(volume(), root / "imagesTr" / "liver_001_0000.nii.gz")
    save(volume(), root / "imagesTr" / "liver_002_0000.nii.gz")
    label = np.zeros(VOLUME, np.uint8)
    label[1:3, 2:6, 3:8] = 2
    save(volume().with_array(label), root / "labelsTr" / "liver_001.nii.gz")
    save(flat(), root / "stray.png")  # beside imagesTr/: not an image of this layout
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "tumour": 2}}))
    workspace = Workspace(root)
    assert list(workspace.entries()) == ["liver_001", "liver_002"]
    assert workspace.labels == {"background": 0, "liver": 1, "tumour": 2}
    assert workspace.label_path("liver_002") == root / "labelsTr" / "liver_002.nii.gz"
    assert workspace.statuses() == {"liver_001": "done", "liver_002": "todo"}
    assert np.array_equal(workspace.label("liver_001"), label)


def test_unknown_ids(workspace: Workspace) -> None:
    for bad in ("c", "../ws/a", "linked", "labelsTr", "mr_0000", "notes", "secret", ""):
        with pytest.raises(UnknownImage, match="no image"):
            workspace.image(bad)
        with pytest.raises(UnknownImage):
            workspace.status(bad)
    assert issubclass(UnknownImage, MedsegError)


def test_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(MedsegError, match="no such workspace folder"):
        Workspace(tmp_path / "missing")
    (tmp_path / "scan.png").write_bytes(b"")
    with pytest.raises(MedsegError, match="not a folder"):
        Workspace(tmp_path / "scan.png")


def test_task_labels_from_dataset_json(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    save(flat(), root / "a.png")
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": "0", "polyp": "1"}}))
    assert Workspace(root).labels == {"background": 0, "polyp": 1}
    for bad in ({"name": "no labels"}, {"labels": ["background"]}, {"labels": {"background": "zero"}}):
        (root / "dataset.json").write_text(json.dumps(bad))
        with pytest.raises(MedsegError, match="unreadable labels"):
            Workspace(root)
    for bad_values in ({"background": 1, "polyp": 2}, {"background": 0, "polyp": -1}):
        (root / "dataset.json").write_text(json.dumps({"labels": bad_values}))
        with pytest.raises(MedsegError, match="non-negative with background 0"):
            Workspace(root)


# ---- finished label maps -----------------------------------------------------------------------------------
def test_save_label_png(workspace: Workspace) -> None:
    path = workspace.save_label("b", square_labels().astype(np.int64))
    assert path == workspace.root / "labelsTr" / "b.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = load(path)
    assert written.array.dtype == np.uint8 and np.array_equal(written.array, square_labels())
    assert workspace.status("b") == "done"
    assert np.array_equal(workspace.label("b"), square_labels())


def test_save_label_nifti_keeps_the_images_geometry(workspace: Workspace) -> None:
    labels = np.zeros(VOLUME, bool)
    labels[1:3, 2:6, 3:8] = True
    path = workspace.save_label("vol", labels)
    assert path == workspace.root / "labelsTr" / "vol.nii.gz"
    written = load(path)
    assert written.shape == VOLUME and written.geometry.matches(GEOMETRY_3D)
    assert written.geometry.matches(workspace.image("vol").geometry)
    assert np.array_equal(written.array, labels.astype(np.uint8))


def test_save_label_refusals_write_nothing(workspace: Workspace) -> None:
    labels_dir = workspace.root / "labelsTr"
    before = {p.name: p.read_bytes() for p in labels_dir.iterdir()}
    refusals = [
        (np.zeros((SIDE, SIDE + 1), np.uint8), r"label map of shape \(16, 17\) for image 'b' of shape \(16, 16\)"),
        (np.zeros((1, SIDE, SIDE), np.uint8), "of shape"),
        (square_labels().astype(np.float32) * 0.5, "integer"),
        (square_labels() * 2, r"label values \[2\] are not in the task's labels"),
        (-square_labels().astype(np.int16), "negative"),
        (np.full((SIDE, SIDE), np.nan), "256 NaN/inf values"),
        (np.full((SIDE, SIDE), "1"), "unsupported dtype"),
    ]
    for labels, message in refusals:
        with pytest.raises(MedsegError, match=message):
            workspace.save_label("b", labels)
    assert {p.name: p.read_bytes() for p in labels_dir.iterdir()} == before
    assert workspace.status("b") == "todo"


def test_a_refused_save_keeps_the_earlier_label_map(workspace: Workspace) -> None:
    path = workspace.save_label("b", square_labels())
    earlier = path.read_bytes()
    with pytest.raises(MedsegError):
        workspace.save_label("b", square_labels() * 3)
    assert path.read_bytes() == earlier and no_temporary_files(path.parent)


def test_a_failed_write_leaves_no_temporary_file(workspace: Workspace) -> None:
    (workspace.root / "labelsTr" / "b.png").mkdir()  # a folder where the file would go: the rename fails
    with pytest.raises(MedsegError):
        workspace.save_label("b", square_labels())
    assert sorted(p.name for p in (workspace.root / "labelsTr").iterdir()) == ["a.png", "b.png"]
    assert no_temporary_files(workspace.root / "labelsTr")


def test_label_values_from_the_task(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    save(flat(), root / "a.png")
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "left": 1, "right": 3}}))
    workspace = Workspace(root)
    saved = workspace.save_label("a", square_labels(3))
    assert np.array_equal(load(saved).array, square_labels(3))
    with pytest.raises(MedsegError, match=r"label values \[2\]"):
        workspace.save_label("a", square_labels(2))


def test_a_label_map_that_no_longer_fits_is_refused_on_reading(workspace: Workspace) -> None:
    with pytest.raises(MedsegError, match="has no finished label map"):
        workspace.label("b")
    save(Image(np.zeros((SIDE, 8), np.uint8)), workspace.root / "labelsTr" / "b.png")
    with pytest.raises(MedsegError, match="of shape"):
        workspace.label("b")


# ---- status, drafts ----------------------------------------------------------------------------------------
def test_status_statuses_and_done_order(workspace: Workspace) -> None:
    # labelsTr/a.png was there before: a is done from the start
    assert workspace.statuses() == {"a": "done", "b": "todo", "mr": "todo", "vol": "todo"}
    old = time.time() - 100
    os.utime(workspace.root / "labelsTr" / "a.png", (old, old))
    workspace.save_label("mr", square_labels())
    time.sleep(0.01)
    workspace.save_label("b", square_labels())
    assert workspace.done() == ["a", "mr", "b"]  # the order they were saved in, oldest first
    workspace.save_label("a", square_labels())  # saved again: now the newest
    assert workspace.done() == ["mr", "b", "a"]
    assert workspace.statuses() == {"a": "done", "b": "done", "mr": "done", "vol": "todo"}
    assert [workspace.status(i) for i in ("a", "b", "mr", "vol")] == ["done", "done", "done", "todo"]


def test_drafts_are_kept_with_their_engine(workspace: Workspace) -> None:
    assert workspace.draft("b") is None
    path = workspace.save_draft("b", square_labels(), "incontext:probe")
    assert path == workspace.root / ".medseg" / "drafts" / "b.nii.gz"
    assert workspace.status("b") == "draft" and workspace.statuses()["b"] == "draft"
    kept = workspace.draft("b")
    assert kept is not None
    labels, engine = kept
    assert engine == "incontext:probe" and np.array_equal(labels, square_labels())
    workspace.save_draft("b", square_labels(), "specialist")  # a newer draft replaces it
    newer = workspace.draft("b")
    assert newer is not None and newer[1] == "specialist"
    with pytest.raises(MedsegError, match="not in the task's labels"):
        workspace.save_draft("b", square_labels(5), "specialist")
    assert "stray" not in workspace.entries()  # a draft is never listed as an image
    workspace.save_label("b", square_labels())  # finishing the image drops its draft
    assert workspace.draft("b") is None and workspace.status("b") == "done"
    assert not (workspace.root / ".medseg" / "drafts" / "b.nii.gz").exists()


def test_a_draft_of_a_volume_keeps_its_geometry(workspace: Workspace) -> None:
    labels = np.zeros(VOLUME, np.uint8)
    labels[2, 3:5, 4:6] = 1
    path = workspace.save_draft("vol", labels, "incontext:probe")
    assert load(path).geometry.matches(GEOMETRY_3D)
    kept = workspace.draft("vol")
    assert kept is not None and np.array_equal(kept[0], labels)


# ---- export ------------------------------------------------------------------------------------------------
def test_export_opens_as_an_nnunet_dataset(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    for name, value in (("p1", 200), ("p2", 180), ("p3", 160)):
        save(flat(value), root / f"{name}.png")
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "polyp": 1, "tool": 2}}))
    workspace = Workspace(root)
    with pytest.raises(MedsegError, match="no finished annotations"):
        workspace.export(tmp_path / "export")
    two = square_labels()
    two[0:2, 0:3] = 2
    workspace.save_label("p2", two)
    workspace.save_label("p1", square_labels())

    target = workspace.export(tmp_path / "export", name="polyps")
    dataset = open_dataset(target)
    assert dataset.layout == "nnunet" and dataset.name == "polyps"
    assert sorted(case.name for case in dataset.cases) == ["p1", "p2"]
    assert dataset.labels == {"background": 0, "polyp": 1, "tool": 2}
    assert dataset.declared_cases == 2 and not dataset.orphan_labels and not dataset.layout_problems
    for case in dataset.cases:
        assert case.label is not None and len(case.images) == 1
        assert np.array_equal(load(case.images[0]).array, workspace.image(case.name).array)
        assert np.array_equal(load(case.label).array, workspace.label(case.name))
    assert workspace.root / "p1.png" in [p for p in root.iterdir()], "the export moved an image"

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(MedsegError, match="exists and is not an empty folder"):
        workspace.export(tmp_path / "busy")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]
    with pytest.raises(MedsegError, match="exists and is not an empty folder"):
        workspace.export(target)
    (tmp_path / "empty").mkdir()
    assert open_dataset(workspace.export(tmp_path / "empty")).declared_cases == 2


def test_export_of_volumes(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    save(volume(), root / "imagesTr" / "liver_001_0000.nii.gz")
    save(volume(), root / "imagesTr" / "liver_002_0000.nii.gz")
    workspace = Workspace(root)
    labels = np.zeros(VOLUME, np.uint8)
    labels[1:3, 2:6, 3:8] = 1
    workspace.save_label("liver_002", labels)
    dataset = open_dataset(workspace.export(tmp_path / "export"))
    assert [case.name for case in dataset.cases] == ["liver_002"] and dataset.info["file_ending"] == ".nii.gz"
    case = dataset.cases[0]
    assert case.label is not None and case.images[0].name == "liver_002_0000.nii.gz"
    exported = load(case.images[0])
    assert exported.geometry.matches(GEOMETRY_3D) and np.array_equal(exported.array, volume().array)
    assert load(case.label).geometry.matches(GEOMETRY_3D) and np.array_equal(load(case.label).array, labels)


def test_export_of_channel_files(workspace: Workspace, tmp_path: Path) -> None:
    workspace.save_label("mr", square_labels())
    with pytest.raises(MedsegError, match=r"\[1, 2\] channels"):  # a (1 channel) is done too
        workspace.export(tmp_path / "mixed")
    (workspace.labels_dir / "a.png").unlink()
    dataset = open_dataset(workspace.export(tmp_path / "export"))
    mr = next(case for case in dataset.cases if case.name == "mr")
    assert [p.name for p in mr.images] == ["mr_0000.png", "mr_0001.png"]
    assert len(dataset.channel_names) == 2


def test_export_of_mixed_formats_is_all_nifti(tmp_path: Path) -> None:
    save(Image(np.full((SIDE, SIDE), 7, np.uint8)), tmp_path / "ws" / "flat.png")
    save(Image(np.full((3, SIDE, SIDE), 5.0, np.float32)), tmp_path / "ws" / "vol.nii.gz")
    workspace = Workspace(tmp_path / "ws")
    workspace.save_label("flat", square_labels())
    workspace.save_label("vol", np.zeros((3, SIDE, SIDE), np.uint8))
    dataset = open_dataset(workspace.export(tmp_path / "export"))
    assert dataset.info["file_ending"] == ".nii.gz"
    assert sorted(p.name for case in dataset.cases for p in case.images) == ["flat_0000.nii.gz", "vol_0000.nii.gz"]
    assert np.array_equal(load(next(c.label for c in dataset.cases if c.name == "flat")).array, square_labels())


def test_export_of_rgb_images_declares_three_channels(tmp_path: Path) -> None:
    rgb = np.zeros((SIDE, SIDE, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[4:10, 5:11] = (10, 240, 30)
    save(Image(rgb, channels=3), tmp_path / "ws" / "photo.png")
    workspace = Workspace(tmp_path / "ws")
    workspace.save_label("photo", square_labels())
    dataset = open_dataset(workspace.export(tmp_path / "export"))
    assert dataset.channel_names == {"0": "R", "1": "G", "2": "B"}
    exported = load(dataset.cases[0].images[0])
    assert exported.channels == 3 and np.array_equal(exported.array, rgb)


def test_a_labels_folder_leading_out_of_the_workspace_is_not_written(tmp_path: Path) -> None:
    save(flat(), tmp_path / "ws" / "a.png")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "ws" / "labelsTr")
    with pytest.raises(MedsegError, match="leads out of the workspace"):
        Workspace(tmp_path / "ws").save_label("a", square_labels())
    assert not any((tmp_path / "elsewhere").iterdir())


# ---- DICOM series: a DICOM-SEG beside the label map --------------------------------------------------------
def make_dicom_workspace(root: Path) -> tuple[Path, fx.DicomSeries]:
    """A workspace holding one CT series (sub-folder ``ct``, 4 slices of 10 x 12) and a PNG, labels liver 1,
    tumour 2."""
    series = fx.write_dicom_series(root / "ct", n_slices=4, rows=10, cols=12)
    save(flat(), root / "a.png")
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "tumour": 2}}))
    return root, series


def series_labels() -> np.ndarray:
    labels = np.zeros((4, 10, 12), np.uint8)
    labels[1:3, 2:6, 3:8] = 1
    labels[2, 7:9, 1:3] = 2
    return labels


def test_a_dicom_series_label_map_is_also_saved_as_a_dicom_seg(tmp_path: Path) -> None:
    root, series = make_dicom_workspace(tmp_path / "ws")
    workspace = Workspace(root)
    assert list(workspace.entries()) == ["a", "ct"]
    path = workspace.save_label("ct", series_labels())
    assert path == root / "labelsTr" / "ct.nii.gz"  # training reads this one
    seg_path = workspace.dicom_seg_path("ct")
    assert seg_path == root / "dicom-seg" / "ct.dcm" and seg_path.is_file()
    seg, image = load(seg_path), workspace.image("ct")
    np.testing.assert_array_equal(seg.array, series_labels())
    assert seg.geometry.matches(image.geometry)
    assert seg.meta["segment_names"] == {1: "liver", 2: "tumour"}
    assert seg.meta["referenced_series_instance_uid"] == series.series_uid
    np.testing.assert_array_equal(load(path).array, series_labels())
    assert list(workspace.entries()) == ["a", "ct"]  # dicom-seg/ is not an image
    assert no_temporary_files(root / "dicom-seg") and no_temporary_files(root / "labelsTr")
    assert workspace.dicom_seg_path("a") is None  # a PNG gets none
    workspace.save_label("a", square_labels())
    assert sorted(p.name for p in (root / "dicom-seg").iterdir()) == ["ct.dcm"]


def test_a_workspace_without_dicom_seg_writes_none(tmp_path: Path) -> None:
    root, _ = make_dicom_workspace(tmp_path / "ws")
    workspace = Workspace(root, dicom_seg=False)
    assert workspace.dicom_seg_path("ct") is None
    workspace.save_label("ct", series_labels())
    assert not (root / "dicom-seg").exists() and (root / "labelsTr" / "ct.nii.gz").is_file()


def test_a_series_a_seg_cannot_reference_saves_nothing(tmp_path: Path) -> None:
    import pydicom

    root, series = make_dicom_workspace(tmp_path / "ws")
    workspace = Workspace(root)
    workspace.image("ct")  # read (and kept) before the header loses an attribute
    broken = series.files[1]
    ds = pydicom.dcmread(broken)
    del ds.FrameOfReferenceUID
    ds.save_as(broken)
    with pytest.raises(MedsegError, match=r"no FrameOfReferenceUID.*--no-dicom-seg") as info:
        workspace.save_label("ct", series_labels())
    assert str(info.value).startswith(str(broken)) and "\n" not in str(info.value)
    assert not (root / "labelsTr" / "ct.nii.gz").exists() and not (root / "dicom-seg" / "ct.dcm").exists()
    assert workspace.status("ct") == "todo"


@pytest.mark.parametrize(
    ("info", "modality"),
    [({"modality": "MRI"}, "MRI"), ({"modality": {"0": "CT"}}, "CT"), ({"channel_names": {"0": "T2"}}, "T2"),
     ({"labels": {"background": 0, "a": 1}}, None), ([1, 2], None)],
)  # fmt: skip
def test_the_task_modality_comes_from_dataset_json(tmp_path: Path, info: object, modality: str | None) -> None:
    (tmp_path / "dataset.json").write_text(json.dumps(info))
    assert _task_modality(tmp_path / "dataset.json") == modality
    assert _task_modality(tmp_path / "missing.json") is None


def test_a_label_map_that_cannot_be_written_leaves_the_previous_seg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import medseg.server.workspace as workspace_module

    root, _ = make_dicom_workspace(tmp_path / "ws")
    workspace = Workspace(root)
    workspace.save_label("ct", series_labels())
    seg_path, label_path = root / "dicom-seg" / "ct.dcm", root / "labelsTr" / "ct.nii.gz"
    seg_before, label_before = seg_path.read_bytes(), label_path.read_bytes()

    def full_disk(image: Image, path: Path, **options: object) -> Path:
        raise MedsegError("cannot write (No space left on device)", path)

    monkeypatch.setattr(workspace_module, "save", full_disk)
    changed = series_labels()
    changed[0] = 0
    with pytest.raises(MedsegError, match="No space left"):
        workspace.save_label("ct", changed)
    assert seg_path.read_bytes() == seg_before and label_path.read_bytes() == label_before
    assert sorted(p.name for p in (root / "dicom-seg").iterdir()) == ["ct.dcm"]  # no backup left behind
