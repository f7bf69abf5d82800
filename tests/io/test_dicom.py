"""DICOM: a series folder (written in shuffled order) and single files."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

import fixtures as fx
from medseg.errors import MedsegError
from medseg.io import label_path_for, load, save


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> fx.DicomSeries:
    return fx.write_dicom_series(tmp_path_factory.mktemp("dicom") / "ct_series")


def test_fixture_is_really_shuffled(series):
    # Written out of order, names sort out of slice order, InstanceNumber follows the writing order.
    assert series.write_order != sorted(series.write_order)
    assert sorted(series.files) != series.files
    instances = [int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber) for f in series.files]
    assert instances != sorted(instances)
    ds = pydicom.dcmread(series.files[0])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"  # explicit VR little endian
    assert float(ds.RescaleSlope) == 2.0
    assert float(ds.RescaleIntercept) == -1024.0


def test_series_slices_are_sorted_by_position(series):
    image = load(series.folder)
    assert image.shape == (5, 16, 16)
    assert image.channels == 1
    for k in range(5):
        # slice k holds raw 1000 + 100*k + ...; HU = 2*raw - 1024
        assert image.array[k, 0, 0] == 2 * (1000 + 100 * k) - 1024
    np.testing.assert_array_equal(image.array, series.hu)


def test_series_rescale_slope_and_intercept_are_applied(series):
    image = load(series.folder)
    assert image.array.dtype.kind in "if"
    assert image.array.min() == 2 * 1000 - 1024
    assert image.array.max() == 2 * (1000 + 400 + 90 + 9) - 1024
    assert image.meta["rescale_slope"] == "2"
    assert image.meta["rescale_intercept"] == "-1024"


def test_series_geometry(series):
    image = load(series.folder)
    g = image.geometry
    # PixelSpacing is (row spacing = dy, column spacing = dx); z spacing comes from the positions.
    assert g.spacing == pytest.approx((0.6, 0.7, 2.5))
    assert image.spacing == pytest.approx((2.5, 0.7, 0.6))
    assert g.origin == pytest.approx(series.positions[0])
    assert g.direction == pytest.approx(np.eye(3).ravel())
    assert g.orientation() == "LPS"
    # The last slice lies where its file says.
    last = g.affine() @ [4, 0, 0, 1]
    assert last[:3] == pytest.approx(series.positions[4])


def test_series_meta(series):
    image = load(series.folder)
    assert image.meta["format"] == "dicom"
    assert image.meta["path"] == str(series.folder)
    assert image.meta["modality"] == "CT"
    assert image.meta["dicom_files"] == 5
    assert image.meta["series_instance_uid"] == series.series_uid
    assert image.meta["series_description"] == "synthetic test series"
    # no patient identifiers
    assert not any("patient" in key.lower() for key in image.meta)


def test_series_with_descending_positions(tmp_path):
    desc = fx.write_dicom_series(tmp_path / "desc", slice_step=-2.5)
    image = load(desc.folder)
    # ordered along +z: the lowest slice (the last written position) comes first
    np.testing.assert_array_equal(image.array, desc.hu[::-1])
    assert image.geometry.origin == pytest.approx(desc.positions[-1])
    assert image.geometry.spacing[2] == pytest.approx(2.5)


def test_series_folder_may_hold_other_files(tmp_path):
    s = fx.write_dicom_series(tmp_path / "ct")
    (s.folder / "README.txt").write_text("not dicom")
    np.testing.assert_array_equal(load(s.folder).array, s.hu)


def test_single_dicom_file_reads_as_2d(tmp_path):
    s = fx.write_dicom_series(tmp_path / "ct", suffix=".dcm")
    image = load(s.files[2])
    assert image.ndim == 2
    assert image.shape == (16, 16)
    np.testing.assert_array_equal(image.array, s.hu[2])
    assert image.geometry.spacing == pytest.approx((0.6, 0.7))
    assert image.geometry.origin == pytest.approx(s.positions[2][:2])
    assert image.meta["format"] == "dicom"
    assert image.meta["modality"] == "CT"


def test_series_label_saved_as_nifti_keeps_geometry(series, tmp_path):
    image = load(series.folder)
    label = image.with_array((image.array > 1000).astype(np.uint8))
    target = label_path_for(series.folder, tmp_path)
    assert target == tmp_path / "ct_series.nii.gz"
    back = load(save(label, target))
    np.testing.assert_array_equal(back.array, label.array)
    assert back.geometry.matches(image.geometry), back.geometry.describe_difference(image.geometry)


def test_series_cannot_be_written_as_dicom(series, tmp_path):
    image = load(series.folder)
    with pytest.raises(MedsegError, match="DICOM"):
        save(image, tmp_path / "out.dcm")
    assert list(tmp_path.iterdir()) == []


def test_series_with_a_corrupt_slice_is_an_error_not_a_shorter_volume(tmp_path):
    folder = tmp_path / "ct"
    series = fx.write_dicom_series(folder, suffix=".dcm")
    broken = series.files[2]
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.raises(MedsegError, match="not readable DICOM slices") as info:
        load(folder)
    assert str(info.value).startswith(str(folder)) and "\n" not in str(info.value)


def test_series_with_a_missing_slice_is_an_error(tmp_path):
    folder = tmp_path / "ct"
    series = fx.write_dicom_series(folder, n_slices=6, suffix=".dcm")
    ordered = sorted(series.files, key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    ordered[3].unlink()
    with pytest.raises(MedsegError, match="not evenly spaced") as info:
        load(folder)
    assert str(info.value).startswith(str(folder))


@pytest.mark.parametrize("without", ["one", "all"])
def test_series_slices_without_a_position_are_an_error(tmp_path, without):
    folder = tmp_path / "ct"
    series = fx.write_dicom_series(folder, n_slices=5, suffix=".dcm")
    for file in series.files[2:3] if without == "one" else series.files:
        ds = pydicom.dcmread(file)
        del ds.ImagePositionPatient
        ds.save_as(file)
    with pytest.raises(MedsegError, match="has no ImagePositionPatient") as info:
        load(folder)
    assert str(info.value).startswith(str(folder)) and "\n" not in str(info.value)


def test_series_with_a_slice_of_another_size_is_an_error(tmp_path):
    """A localizer filed with its series: refused naming the odd file (issue 22)."""
    series = fx.write_dicom_series(tmp_path / "ct", n_slices=4, suffix=".dcm")
    ds = pydicom.dcmread(series.files[1])
    ds.Rows, ds.Columns = 8, 8
    ds.PixelData = np.zeros((8, 8), np.uint16).tobytes()
    ds.save_as(series.files[1])
    with pytest.raises(MedsegError, match="slice size differs") as info:
        load(series.folder)
    assert series.files[1].name in str(info.value) and "\n" not in str(info.value)
