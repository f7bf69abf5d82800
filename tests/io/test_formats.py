"""Extensions, format names and where a label map for an input is written."""

from __future__ import annotations

from pathlib import Path

import pytest

import fixtures as fx
from medseg.errors import MedsegError
from medseg.io import SUPPORTED_EXTENSIONS, format_of, label_path_for, split_extension
from medseg.io.formats import check_label_target, is_image_file


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("case_0000.nii.gz", ("case_0000", ".nii.gz")),
        ("CASE.NII.GZ", ("CASE", ".NII.GZ")),  # the extension keeps its case
        ("brain.nii", ("brain", ".nii")),
        ("scan.v2.nrrd", ("scan.v2", ".nrrd")),
        ("img.png", ("img", ".png")),
        ("archive.tar.gz", ("archive.tar", ".gz")),  # unknown: the last suffix only
        ("README", ("README", "")),
    ],
)
def test_split_extension(name, expected):
    assert split_extension(Path("/some/dir") / name) == expected


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.nii.gz", "nifti"),
        ("a.nii", "nifti"),
        ("a.NII.GZ", "nifti"),
        ("a.nrrd", "nrrd"),
        ("a.nhdr", "nrrd"),
        ("a.mha", "metaimage"),
        ("a.mhd", "metaimage"),
        ("a.dcm", "dicom"),
        ("a.png", "png"),
        ("a.PNG", "png"),
        ("a.jpg", "jpeg"),
        ("a.jpeg", "jpeg"),
        ("a.bmp", "bmp"),
        ("a.tif", "tiff"),
        ("a.tiff", "tiff"),
        ("a.gif", "gif"),
        ("a.npy", "npy"),
        ("a.npz", "npz"),
        ("a.mrc", "mrc"),
    ],
)
def test_format_of(name, fmt):
    assert format_of(name) == fmt


def test_every_supported_extension_has_a_format():
    for ext in SUPPORTED_EXTENSIONS:
        assert format_of(f"x{ext}")


def test_a_folder_is_a_dicom_series(tmp_path):
    assert format_of(tmp_path) == "dicom"


@pytest.mark.parametrize("name", ["scan.xyz", "scan", "scan.gz"])
def test_unknown_extension_is_one_line_with_the_path(tmp_path, name):
    path = tmp_path / name
    with pytest.raises(MedsegError) as err:
        format_of(path)
    text = str(err.value)
    assert "\n" not in text
    assert str(path) in text
    assert "unknown file extension" in text


def test_is_image_file_skips_hidden_and_temporary_files():
    assert is_image_file(Path("case.nii.gz"))
    assert is_image_file(Path("x.PNG"))
    assert not is_image_file(Path(".case.abc123.tmp"))
    assert not is_image_file(Path(".hidden.nii.gz"))
    assert not is_image_file(Path("notes.txt"))


# --------------------------------------------------------------------------------------------------
# label_path_for


@pytest.mark.parametrize(
    ("name", "label_name"),
    [
        ("photo.jpg", "photo.png"),
        ("photo.JPEG", "photo.png"),
        ("anim.gif", "anim.png"),
        ("case_0000.nii.gz", "case_0000.nii.gz"),  # _0000 is not dropped here
        ("case.nii", "case.nii"),
        ("case.nrrd", "case.nrrd"),
        ("case.mha", "case.mha"),
        ("slide.png", "slide.png"),
        ("slide.tif", "slide.tif"),
        ("arr.npy", "arr.npy"),
        ("medsam.npz", "medsam.npz"),
        ("tomo.mrc", "tomo.nii.gz"),
        ("slice.dcm", "slice.nii.gz"),
    ],
)
def test_label_path_for_files(tmp_path, name, label_name):
    out = tmp_path / "labels"
    assert label_path_for(tmp_path / name, out) == out / label_name


def test_label_path_for_takes_the_case_name_separately(tmp_path):
    out = tmp_path / "labels"
    assert label_path_for(tmp_path / "case_0000.nii.gz", out, case="case") == out / "case.nii.gz"
    assert label_path_for(tmp_path / "photo.jpg", out, case="p1") == out / "p1.png"


def test_label_path_for_a_dicom_folder(tmp_path):
    series = fx.write_dicom_series(tmp_path / "patient7_ct")
    out = tmp_path / "labels"
    assert label_path_for(series.folder, out) == out / "patient7_ct.nii.gz"
    assert label_path_for(series.folder, out, case="p7") == out / "p7.nii.gz"


def test_label_path_for_a_dicom_folder_with_dots_in_its_name(tmp_path):
    folder = tmp_path / "1.2.840.113619"
    folder.mkdir()
    assert label_path_for(folder, tmp_path / "o") == tmp_path / "o" / "1.2.840.113619.nii.gz"


def test_label_path_for_unknown_extension_raises(tmp_path):
    with pytest.raises(MedsegError):
        label_path_for(tmp_path / "x.xyz", tmp_path)


def test_label_path_for_an_existing_dicom_file(tmp_path):
    series = fx.write_dicom_series(tmp_path / "ct", suffix=".dcm")
    assert label_path_for(series.files[0], tmp_path / "o") == tmp_path / "o" / f"{series.files[0].stem}.nii.gz"


@pytest.mark.parametrize(
    ("name", "ndim", "fragment"),
    [
        ("a.png", 3, "cannot write a 3D"),
        ("a.jpg", 3, "as JPEG"),  # not "use .png": no way out for a volume
        ("a.jpg", 2, "lossy"),
        ("a.mrc", 2, "MRC"),
        ("a.gif", 2, "lossy"),
    ],
)
def test_check_label_target_refuses_what_save_would(tmp_path, name, ndim, fragment):
    with pytest.raises(MedsegError, match=fragment) as caught:
        check_label_target(tmp_path / name, ndim)
    assert caught.value.path == tmp_path / name


@pytest.mark.parametrize(("name", "ndim"), [("a.png", 2), ("a.tif", 3), ("a.nii.gz", 3), ("a.dcm", 3), ("a.nrrd", 2)])
def test_check_label_target_takes_what_save_writes(tmp_path, name, ndim):
    check_label_target(tmp_path / name, ndim)
