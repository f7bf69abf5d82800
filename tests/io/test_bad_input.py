"""Bad input: every problem is a `MedsegError` whose message is one line naming the file.

A failed `save` leaves nothing behind: no output file and no hidden temporary file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import fixtures as fx
from medseg.errors import MedsegError
from medseg.io import Image, load, save


def load_error(path: Path, **kwargs) -> str:
    """The one-line message of the `MedsegError` that loading ``path`` raises."""
    with pytest.raises(MedsegError) as err:
        load(path, **kwargs)
    text = str(err.value)
    assert "\n" not in text, text
    assert str(path) in text, text
    assert err.value.path == Path(path)
    return text


# --------------------------------------------------------------------------------------------------
# load


def test_missing_file(tmp_path):
    assert "no such file" in load_error(tmp_path / "nope.nii.gz")


def test_zero_byte_file(tmp_path):
    for name in ("empty.nii.gz", "empty.png", "empty.npy"):
        (tmp_path / name).write_bytes(b"")
        assert "empty" in load_error(tmp_path / name)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_truncated_nifti(tmp_path, ext):
    whole = fx.write_nifti(tmp_path / f"whole{ext}").read_bytes()
    path = tmp_path / f"half{ext}"
    path.write_bytes(whole[: len(whole) // 2])
    assert "truncated" in load_error(path)


def test_truncated_nifti_just_short_of_the_end(tmp_path):
    whole = fx.write_nifti(tmp_path / "whole.nii").read_bytes()
    path = tmp_path / "short.nii"
    path.write_bytes(whole[:-1])
    assert "truncated" in load_error(path)


def test_nifti_with_trailing_bytes_is_fine(tmp_path):
    whole = fx.write_nifti(tmp_path / "whole.nii").read_bytes()
    path = tmp_path / "long.nii"
    path.write_bytes(whole + b"\0" * 16)
    np.testing.assert_array_equal(load(path).array, fx.volume_values())


@pytest.mark.parametrize("ext", [".nrrd", ".mha", ".tif", ".npy", ".npz", ".bmp"])
def test_other_truncated_files(tmp_path, ext):
    rng = np.random.default_rng(1)
    array = rng.integers(0, 250, (24, 24) if ext == ".bmp" else (6, 24, 24)).astype(np.uint8)
    whole = save(Image(array), tmp_path / f"whole{ext}").read_bytes()
    path = tmp_path / f"half{ext}"
    path.write_bytes(whole[: len(whole) // 2])
    load_error(path)


def test_truncated_png(tmp_path):
    rng = np.random.default_rng(2)
    whole, _ = fx.write_png_grey(tmp_path / "whole.png", rng.integers(0, 255, (64, 64)).astype(np.uint8))
    path = tmp_path / "half.png"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert "cannot read" in load_error(path)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # mrcfile warns before it fails
@pytest.mark.parametrize("ext", [".png", ".jpg", ".nii.gz", ".nrrd", ".mha", ".dcm", ".tif", ".npy", ".npz", ".mrc"])
def test_random_bytes(tmp_path, ext):
    path = tmp_path / f"noise{ext}"
    path.write_bytes(np.random.default_rng(3).bytes(2000))
    load_error(path)


def test_unknown_extension(tmp_path):
    path = tmp_path / "scan.xyz"
    path.write_bytes(b"something")
    assert "unknown file extension '.xyz'" in load_error(path)


def test_4d_nifti(tmp_path):
    assert "4D" in load_error(fx.write_nifti_4d(tmp_path / "fmri.nii.gz"))


@pytest.mark.parametrize(
    ("array", "words"),
    [
        (np.zeros((0, 5)), "empty"),
        (np.zeros(7), "1D"),
        (np.zeros((2, 3, 4, 5)), "4D"),
        (np.array(["a", "b"]), "dtype"),
    ],
)
def test_unusable_npy(tmp_path, array, words):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    assert words in load_error(path)


def test_npy_with_objects_is_not_unpickled(tmp_path):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    load_error(path)


def test_npz_without_known_keys(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, foo=np.zeros((4, 4)), bar=np.ones((4, 4)))
    text = load_error(path)
    assert "foo" in text
    assert "imgs" in text


def test_npz_missing_requested_key(tmp_path):
    path, _ = fx.write_medsam_npz_3d(tmp_path / "case.npz")
    assert "segs" in load_error(path, key="segs")


def test_npz_with_spacing_of_the_wrong_length(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, imgs=np.zeros((4, 5, 6)), spacing=np.array([1.0, 1.0]))
    assert "spacing" in load_error(path)


def test_npz_with_non_positive_spacing(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, imgs=np.zeros((4, 5, 6)), spacing=np.array([1.0, 0.0, 1.0]))
    assert "positive" in load_error(path)


def test_folder_without_dicom(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here")
    assert "no DICOM" in load_error(folder)


def test_empty_folder(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    load_error(folder)


def test_folder_with_two_dicom_series(tmp_path):
    folder = tmp_path / "mixed"
    first = fx.write_dicom_series(folder, name_prefix="a")
    second = fx.write_dicom_series(folder, name_prefix="b", slice_step=5.0)
    text = load_error(folder)
    assert "2 DICOM series" in text
    assert first.series_uid in text
    assert second.series_uid in text


# --------------------------------------------------------------------------------------------------
# save


@pytest.fixture
def volume_input(tmp_path) -> tuple[Path, Image]:
    path = fx.write_nifti(tmp_path / "in" / "case_0000.nii.gz")
    return path, load(path)


def save_error(image: Image, target: Path, **kwargs) -> str:
    """The one-line message of the `MedsegError` that saving to ``target`` raises."""
    with pytest.raises(MedsegError) as err:
        save(image, target, **kwargs)
    text = str(err.value)
    assert "\n" not in text, text
    assert str(target) in text, text
    return text


def folder_listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_saving_over_the_input_is_refused(volume_input):
    path, image = volume_input
    before = path.read_bytes()
    listing = folder_listing(path.parent)
    label = image.with_array((image.array % 2).astype(np.uint8))
    # the label map no longer carries the path: protect names the input
    assert "overwrite" in save_error(label, path, protect=(path,))
    # the image itself carries its path
    assert "overwrite" in save_error(image, path)
    # a different spelling of the same path
    assert "overwrite" in save_error(image, path.parent / ".." / "in" / path.name)
    assert path.read_bytes() == before
    assert folder_listing(path.parent) == listing


@pytest.mark.parametrize("ext", [".jpg", ".jpeg", ".gif"])
def test_label_map_in_a_lossy_format_is_refused(tmp_path, ext):
    path, labels = fx.write_png_palette_labels(tmp_path / "labels.png")
    label = load(path).with_array(labels)
    out = tmp_path / "out"
    assert "lossy" in save_error(label, out / f"label{ext}")
    assert folder_listing(out) == []


@pytest.mark.parametrize("ext", [".png", ".bmp", ".jpg"])
def test_3d_as_2d_raster_is_refused(volume_input, tmp_path, ext):
    _, image = volume_input
    out = tmp_path / "out"
    out.mkdir()
    array = image.array.astype(np.float32) if ext == ".jpg" else (image.array % 3).astype(np.uint8)
    assert "3D" in save_error(image.with_array(array), out / f"label{ext}")
    assert folder_listing(out) == []


@pytest.mark.parametrize(("ext", "words"), [(".dcm", "DICOM"), (".mrc", "MRC"), (".xyz", "unknown"), ("", "extension")])
def test_unwritable_formats(volume_input, tmp_path, ext, words):
    _, image = volume_input
    out = tmp_path / "out"
    out.mkdir()
    assert words in save_error(image.with_array(image.array), out / f"result{ext}")
    assert folder_listing(out) == []


@pytest.mark.parametrize(
    ("name", "image", "words"),
    [
        ("float.png", Image(np.linspace(0, 1, 20).reshape(4, 5)), "float"),
        ("negative.png", Image(np.full((4, 5), -1, np.int16)), "do not fit"),
        ("big.png", Image(np.full((4, 5), 70000, np.int32)), "do not fit"),
        ("rgb16.png", Image(np.full((6, 5, 3), 300, np.uint16), channels=3), "8-bit"),
        ("label16.bmp", Image(np.full((4, 5), 300, np.uint16)), "8-bit"),
    ],
)
def test_values_a_raster_cannot_hold(tmp_path, name, image, words):
    out = tmp_path / "out"
    assert words in save_error(image, out / name)
    assert folder_listing(out) == []


def test_failed_save_keeps_an_earlier_output(tmp_path):
    target = tmp_path / "pred.png"
    save(Image(np.ones((4, 5), np.uint8)), target)
    save_error(Image(np.zeros((2, 4, 5), np.uint8)), target)
    np.testing.assert_array_equal(load(target).array, np.ones((4, 5)))
    assert folder_listing(tmp_path) == ["pred.png"]


def test_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    from medseg.io import sitk_io

    def broken_write(image, path):
        path.write_bytes(b"partial")
        raise RuntimeError("itk::ExceptionObject (0x1)\nwrite failed: disk full")

    monkeypatch.setattr(sitk_io, "write", broken_write)
    out = tmp_path / "out"
    assert "disk full" in save_error(Image(np.zeros((3, 4, 5), np.uint8)), out / "pred.nii.gz")
    assert folder_listing(out) == []


def test_bad_input_leaves_the_source_folder_alone(tmp_path):
    src = tmp_path / "src"
    s = fx.write_dicom_series(src / "ct")
    copy = tmp_path / "copy"
    shutil.copytree(s.folder, copy)
    image = load(s.folder)
    save_error(image, s.folder / "IM000.dcm")
    assert folder_listing(s.folder) == folder_listing(copy)
