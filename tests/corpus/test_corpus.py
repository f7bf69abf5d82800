"""The corpus: input faults taken from public bug reports of comparable tools, each rebuilt as a small synthetic
file by ``makers.py`` and held to the right behaviour here (right, or refused in one line naming the file).

`SOURCES` names the thread each case comes from (REPORTS.md lists every report read). The hostile cases run in
a subprocess that reports its peak resident memory (``ru_maxrss``) before and after the read: the read may add
at most `MAX_GROWTH_MB`, whatever the file declares.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import fixtures as fx
from cli_helpers import assert_one_error_line, run_cli
from corpus import makers
from corpus.probe import LIMIT, read_in_subprocess
from medseg.errors import MedsegError, MedsegNotice
from medseg.io import Image, load, save

# case (test name without ``test_``) -> the public thread it was made from
SOURCES: dict[str, str] = {
    "nifti_header_claims_1e9_voxels": "https://github.com/SimpleITK/SimpleITK/issues/696",
    "nifti_header_claims_1e9_voxels_over_a_high_limit": "https://github.com/SimpleITK/SimpleITK/issues/696",
    "gzip_bomb_nifti": "https://github.com/wasserth/TotalSegmentator/issues/240",
    "gzip_bomb_behind_a_small_header": "https://github.com/wasserth/TotalSegmentator/issues/240",
    "nifti_extension_bomb": "https://github.com/wasserth/TotalSegmentator/issues/89",
    "dicom_rows_60000": "https://github.com/SimpleITK/SimpleITK/issues/696",
    "dicom_100000_frames": "https://github.com/Slicer/Slicer/issues/6773",
    "dicom_series_rows_30000": "https://github.com/SimpleITK/SimpleITK/issues/696",
    "png_bomb_refused_by_medseg": "https://github.com/mittagessen/kraken/issues/299",
    "png_bomb_refused_by_pillow": "https://github.com/python-pillow/Pillow/issues/5218",
    "nrrd_header_huge": "https://github.com/wasserth/TotalSegmentator/issues/89",
    "mha_header_huge": "https://github.com/wasserth/TotalSegmentator/issues/89",
    "npy_header_huge": "https://github.com/wasserth/TotalSegmentator/issues/240",
    "output_on_proc": "https://github.com/MIC-DKFZ/nnUNet/issues/1130",
    "output_symlink_loop": "https://github.com/MIC-DKFZ/nnUNet/issues/964",
    "input_symlink_loop": "https://github.com/MIC-DKFZ/nnUNet/issues/964",
    "killed_run_staging_removed": "https://github.com/wasserth/TotalSegmentator/issues/105",
    "two_series_listed_and_chosen": "https://github.com/SimpleITK/SimpleITK/issues/581",
    "missing_slice_names_neighbours": "https://github.com/moloney/dcmstack/issues/55",
    "per_slice_rescale_reads_float": "https://github.com/innolitics/dicom-numpy/issues/1",
    "gantry_tilt_resampled_onto_an_orthogonal_grid": "https://github.com/Slicer/Slicer/issues/4409",
    "gantry_tilt_uneven_refused": "https://github.com/rordenlab/dcm2niix/issues/253",
    "text_position_refused": "https://github.com/moloney/dcmstack/issues/63",
    "two_echoes_named": "https://github.com/SimpleITK/SimpleITK/issues/1809",
    "ct_series_has_no_labels_table": "https://github.com/MIC-DKFZ/nnUNet/issues/1007",
    "float_labels_near_integers_rounded": "https://github.com/MIC-DKFZ/nnUNet/issues/2868",
    "float_labels_fractional_refused": "https://github.com/MIC-DKFZ/nnUNet/issues/2029",
    "mask_0_255_hint": "https://github.com/MIC-DKFZ/nnUNet/issues/1777",
    "jpeg_mask_refused": "https://github.com/MIC-DKFZ/nnUNet/issues/2404",
    "jpeg_mask_binarised_with_two_labels": "https://github.com/MIC-DKFZ/nnUNet/issues/1678",
    "jpeg_ground_truth_not_scored": "https://github.com/MIC-DKFZ/nnUNet/issues/2404",
    "one_slice_label_for_2d_image": "https://github.com/MIC-DKFZ/nnUNet/pull/797",
    "npy_mask_h_w_1": "https://github.com/MIC-DKFZ/nnUNet/pull/797",
    "info_4d_cine": "https://github.com/MIC-DKFZ/nnUNet/issues/858",
    "info_nan_counted": "https://github.com/Project-MONAI/MONAI/issues/1846",
    "info_alpha_opaque": "https://github.com/YavorGIvanov/sam.cpp/issues/12",
    "info_alpha_not_opaque": "https://github.com/YavorGIvanov/sam.cpp/issues/12",
    "info_sform_qform_disagree": "https://github.com/MIC-DKFZ/nnUNet/issues/1956",
    "truncated_nifti": "https://github.com/wasserth/TotalSegmentator/issues/105",
    "nifti_vox_offset_inside_the_header": "https://github.com/epam/mriviewer/pull/249",
    "enhanced_ct_frames_placed_by_position": "https://github.com/Slicer/Slicer/issues/6773",
    "enhanced_ct_two_time_points_refused": "https://github.com/horosproject/horos/issues/543",
}
# What reading a hostile file may add to the process's peak resident memory.
MAX_GROWTH_MB = 100


def measure(path: Path, limit: str = LIMIT) -> dict[str, object]:
    """`probe.read_in_subprocess`, printed, with the read's growth of peak memory held under `MAX_GROWTH_MB`."""
    result = read_in_subprocess(path, limit)
    growth = float(result["peak_mb"]) - float(result["before_mb"])  # type: ignore[arg-type]
    print(f"{path.name}: {str(result['outcome'])[:100]} | peak {result['peak_mb']:.0f} MB, read added {growth:.0f} MB")
    assert growth < MAX_GROWTH_MB, result
    return result


def refused(result: dict[str, object], path: Path, *fragments: str) -> None:
    outcome = str(result["outcome"])
    assert outcome.startswith(f"error {path}: "), outcome
    assert "\n" not in outcome
    for fragment in fragments:
        assert fragment in outcome, outcome


def load_error(path: Path, **kwargs: object) -> str:
    with pytest.raises(MedsegError) as caught:
        load(path, **kwargs)  # type: ignore[arg-type]
    text = str(caught.value)
    assert "\n" not in text and str(path) in text, text
    return text


def test_every_case_names_its_source() -> None:
    tests = {name[5:] for name in globals() if name.startswith("test_") and name != "test_every_case_names_its_source"}
    assert tests == set(SOURCES), tests ^ set(SOURCES)
    assert len(SOURCES) >= 30


# ---- hostile sizes ------------------------------------------------------------------------------------------


def test_nifti_header_claims_1e9_voxels(tmp_path: Path) -> None:
    path = makers.nifti_claims_1e9_voxels(tmp_path)
    refused(measure(path), path, "1000 x 1000 x 1000", "MEDSEG_MAX_VOXELS")


def test_nifti_header_claims_1e9_voxels_over_a_high_limit(tmp_path: Path) -> None:
    """With the limit raised, the file's length (1.3 KB for 2 GB declared) refuses it without reading."""
    path = makers.nifti_claims_1e9_voxels(tmp_path)
    refused(measure(path, limit="1e10"), path, "truncated")


def test_gzip_bomb_nifti(tmp_path: Path) -> None:
    path = makers.gzip_bomb_nifti(tmp_path)
    assert path.stat().st_size < 3_000_000
    refused(measure(path), path, "1300 x 1300 x 1300")


def test_gzip_bomb_behind_a_small_header(tmp_path: Path) -> None:
    """The declared 10^3 voxels are read; the 2.2 GB of gzip behind them is never inflated."""
    result = measure(makers.gzip_bomb_behind_small_nifti(tmp_path))
    assert result["outcome"] == "read (10, 10, 10)", result


def test_nifti_extension_bomb(tmp_path: Path) -> None:
    path = makers.nifti_extension_bomb(tmp_path)
    refused(measure(path, limit="1e10"), path, "header extensions")


def test_dicom_rows_60000(tmp_path: Path) -> None:
    path = makers.dicom_rows_60000(tmp_path)
    refused(measure(path), path, "60000 x 60000")


def test_dicom_100000_frames(tmp_path: Path) -> None:
    path = makers.dicom_100000_frames(tmp_path)
    refused(measure(path), path, "100000")


def test_dicom_series_rows_30000(tmp_path: Path) -> None:
    path = makers.dicom_series_rows_30000(tmp_path)
    refused(measure(path), path, "30000 x 30000 x 3")


def test_png_bomb_refused_by_medseg(tmp_path: Path) -> None:
    """Under Pillow's own refusal (twice its MAX_IMAGE_PIXELS) but over medseg's limit."""
    path = makers.png_bomb(tmp_path, side=12000)
    refused(measure(path), path, "12000 x 12000")


def test_png_bomb_refused_by_pillow(tmp_path: Path) -> None:
    """Over Pillow's own limit (twice MAX_IMAGE_PIXELS) with medseg's raised: Pillow's error, in one line."""
    path = makers.png_bomb(tmp_path)
    refused(measure(path, limit="1e10"), path, "decompression bomb")


def test_nrrd_header_huge(tmp_path: Path) -> None:
    path = makers.nrrd_header_huge(tmp_path)
    refused(measure(path), path, "2000 x 2000 x 2000")


def test_mha_header_huge(tmp_path: Path) -> None:
    path = makers.mha_header_huge(tmp_path)
    refused(measure(path), path, "2000 x 2000 x 2000")


def test_npy_header_huge(tmp_path: Path) -> None:
    path = makers.npy_header_huge(tmp_path)
    refused(measure(path), path, "100000 x 100000")


# ---- outputs and leftovers ----------------------------------------------------------------------------------


def test_output_on_proc(tmp_path: Path) -> None:
    """Refused before the model is even looked for (the model folder here does not exist)."""
    image = makers.png_image_12x16(tmp_path)
    result = run_cli("predict", tmp_path / "no_model", image, "-o", "/proc/medseg_out")
    assert_one_error_line(result, "/proc/medseg_out", "kernel file system")
    result = run_cli("prompt", image, "--box", "1,1,5,5", "-o", "/proc/self/x.png")
    assert_one_error_line(result, "/proc/self/x.png", "kernel file system")
    result = run_cli("prompt", image, "--box", "1,1,5,5", "-o", "/dev/full")  # a device, not a folder
    assert_one_error_line(result, "/dev/full is a character device, not a file or folder to hold a result")


def test_output_symlink_loop(tmp_path: Path) -> None:
    image = makers.png_image_12x16(tmp_path)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    result = run_cli("predict", tmp_path / "no_model", image, "-o", tmp_path / "loop")
    assert_one_error_line(result, "symbolic link loop")
    result = run_cli("plan", tmp_path, "-o", tmp_path / "loop" / "plan")
    assert_one_error_line(result, "symbolic link loop")


def test_input_symlink_loop(tmp_path: Path) -> None:
    (tmp_path / "a.nii.gz").symlink_to(tmp_path / "b.nii.gz")
    (tmp_path / "b.nii.gz").symlink_to(tmp_path / "a.nii.gz")
    assert "symbolic link loop" in load_error(tmp_path / "a.nii.gz")
    assert_one_error_line(run_cli("train", tmp_path / "a.nii.gz", "-o", tmp_path / "run"), "symbolic link loop")


def test_killed_run_staging_removed(tmp_path: Path) -> None:
    from medseg.inference.engines import Segmentation
    from medseg.inference.folders import cases_of, predict_folder

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "out"
    host = socket.gethostname().replace(".", "_")
    left = out / f".medseg-staging.{int(gone.stdout)}@{host}.x1y2"  # what a kill -9 during predict leaves
    (left / "probabilities").mkdir(parents=True)
    (left / "case.png").write_bytes(b"partial")
    live = out / f".medseg-staging.{os.getpid()}@{host}.keep"  # a run still going (this process) keeps its folder
    live.mkdir()
    elsewhere = out / f".medseg-staging.{int(gone.stdout)}@another_host.abcd"  # its pid cannot be checked here
    elsewhere.mkdir()
    (tmp_path / "in").mkdir()
    image = makers.png_image_12x16(tmp_path / "in")

    def predict(img):  # type: ignore[no-untyped-def]
        labels = (img.array > 100).astype(np.uint8)
        return Segmentation(img.with_array(labels), [1], "threshold")

    predict_folder(predict, cases_of(image.parent), out)
    assert not left.exists() and live.exists() and elsewhere.exists()
    assert (out / "image.png").is_file()


# ---- DICOM geometry and values ------------------------------------------------------------------------------


def test_two_series_listed_and_chosen(tmp_path: Path) -> None:
    folder = makers.two_series_one_folder(tmp_path)
    text = load_error(folder)
    assert "2 DICOM series: #3 'T1 AX' (MR, 5 files); #4 'T2 AX' (MR, 4 files)" in text and "--series" in text
    assert load(folder, series="4").shape == (4, 16, 16)
    assert load(folder, series="3").shape == (5, 16, 16)
    assert "no series match" in load_error(folder, series="9")
    result = run_cli("info", folder, "--series", "4")
    assert result.exit_code == 0 and "T2 AX" in result.stdout, result.output


def test_missing_slice_names_neighbours(tmp_path: Path) -> None:
    folder = makers.series_missing_slice(tmp_path)
    text = load_error(folder)
    assert "5 mm between" in text and "2.5 mm apart" in text and "1 missing slice" in text
    assert text.count(".dcm") == 2  # the files on each side of the gap


def test_per_slice_rescale_reads_float(tmp_path: Path) -> None:
    import pydicom

    folder = makers.series_per_slice_rescale(tmp_path)
    image = load(folder)
    assert image.array.dtype.kind == "f"
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        k = round((float(ds.ImagePositionPatient[2]) - image.geometry.origin[2]) / 2.5)
        expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_allclose(image.array[k], expected, rtol=1e-6)


@pytest.mark.parametrize("degrees", [12.0, -20.0])
def test_gantry_tilt_resampled_onto_an_orthogonal_grid(tmp_path: Path, degrees: float) -> None:
    """Each voxel of the resampled volume holds the phantom's value at its own physical point (within the
    rounding of the stored and the resampled values), on a grid wide enough for every slice, with a notice."""
    folder = makers.series_gantry_tilt(tmp_path, degrees)
    with pytest.warns(MedsegNotice, match=f"sheared {abs(degrees):.2f} degrees"):
        image = load(folder)
    assert image.geometry.orientation() == "LPS" and image.shape[1] > 16
    assert "resampled" in image.meta["gantry_tilt"] and "dicom_source" not in image.meta
    index = np.indices(image.shape).reshape(3, -1).T  # (k, row, column)
    affine = image.geometry.affine()
    points = index @ affine[:3, :3].T + affine[:3, 3]
    shift = 2.5 * np.tan(np.radians(degrees))
    source_row = (points[:, 1] - (-35.5 + index[:, 0] * shift)) / 0.7
    source_column = (points[:, 0] + 40.0) / 0.6
    inside = (source_row >= 0) & (source_row <= 15) & (source_column >= 0) & (source_column <= 15)
    assert inside.sum() >= 6 * 15 * 15  # the acquired slices land on the new grid
    error = np.abs(image.array.reshape(-1)[inside] - makers.tilt_phantom(points[inside]))
    assert error.max() <= 1.0, error.max()
    with pytest.warns(MedsegNotice):
        result = run_cli("info", folder)
    assert result.exit_code == 0 and "gantry tilt" in result.stdout, result.output


def test_gantry_tilt_uneven_refused(tmp_path: Path) -> None:
    import pydicom

    folder = makers.series_gantry_tilt(tmp_path)
    last = max(folder.iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    ds = pydicom.dcmread(last)
    ds.ImagePositionPatient = [
        ds.ImagePositionPatient[0],
        float(ds.ImagePositionPatient[1]) + 2.0,
        ds.ImagePositionPatient[2],
    ]
    ds.save_as(last)
    assert "not a gantry tilt medseg can correct" in load_error(folder)


def test_text_position_refused(tmp_path: Path) -> None:
    text = load_error(makers.series_text_position(tmp_path))
    assert "ImagePositionPatient" in text and "abc" in text


def test_two_echoes_named(tmp_path: Path) -> None:
    text = load_error(makers.series_two_echoes(tmp_path))
    assert "two echoes (EchoNumbers 1 and 2)" in text


def test_ct_series_has_no_labels_table(tmp_path: Path) -> None:
    result = run_cli("info", makers.ct_series_few_values(tmp_path))
    assert result.exit_code == 0, result.output
    assert "labels" not in result.stdout.split("dtype")[1]


def test_enhanced_ct_frames_placed_by_position(tmp_path: Path) -> None:
    """Frames stored out of order are sorted by their own positions; spacing from them, not 1 mm."""
    path, source = makers.enhanced_ct_shuffled_frames(tmp_path)
    enhanced, series = load(path), load(source)
    assert enhanced.geometry.matches(series.geometry), enhanced.geometry.describe_difference(series.geometry)
    np.testing.assert_array_equal(enhanced.array, series.array)
    folder = tmp_path / "one_file"
    folder.mkdir()
    path.rename(folder / path.name)  # a folder holding only the enhanced file reads the same
    np.testing.assert_array_equal(load(folder).array, series.array)


def test_enhanced_ct_two_time_points_refused(tmp_path: Path) -> None:
    path, _ = makers.enhanced_ct_shuffled_frames(tmp_path, duplicate=True)
    assert "two slices at one position (frame" in load_error(path)


# ---- label files --------------------------------------------------------------------------------------------


def _dataset(tmp_path: Path, image: Path, label: Path, labels: dict[str, int]) -> Path:
    """A dataset of one case (images/ + masks/, files paired by name whatever their format): ``image`` and
    ``label`` copied in, ``labels`` declared in dataset.json."""
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "images" / f"case{''.join(image.suffixes)}").write_bytes(image.read_bytes())
    (root / "masks" / f"case{''.join(label.suffixes)}").write_bytes(label.read_bytes())
    info = {"labels": {"background": 0, **labels}}
    (root / "dataset.json").write_text(json.dumps(info))
    return root


def _problems(root: Path) -> list[str]:
    from medseg.data import open_dataset
    from medseg.data.check import check_dataset

    return [p.problem for p in check_dataset(open_dataset(root)).problems]


def test_float_labels_near_integers_rounded(tmp_path: Path) -> None:
    from medseg.io import as_label_array

    path = makers.float_labels_near_integers(tmp_path)
    with pytest.warns(MedsegNotice, match="rounded"):
        labels = as_label_array(load(path))
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2]


def test_float_labels_fractional_refused(tmp_path: Path) -> None:
    from medseg.io import as_label_array

    with pytest.raises(MedsegError, match="non-integer values"):
        as_label_array(load(makers.float_labels_fractional(tmp_path)))


def test_mask_0_255_hint(tmp_path: Path) -> None:
    root = _dataset(tmp_path, makers.png_image_12x16(tmp_path), makers.mask_0_255_png(tmp_path), {"lesion": 1})
    assert any("divide it by 255" in p for p in _problems(root)), _problems(root)


def test_jpeg_mask_refused(tmp_path: Path) -> None:
    mask = makers.mask_jpeg(tmp_path)
    assert len(np.unique(load(mask).array)) > 2  # the grey values compression made
    image = fx.write_png_grey(tmp_path / "img.png", (np.arange(32 * 32) % 200).astype(np.uint8).reshape(32, 32))[0]
    root = _dataset(tmp_path, image, mask, {"lesion": 1, "vessel": 2})
    assert any("lossy" in p and "re-export it as PNG" in p for p in _problems(root)), _problems(root)


def test_jpeg_mask_binarised_with_two_labels(tmp_path: Path) -> None:
    from medseg.data import open_dataset
    from medseg.data.cases import load_case

    mask = makers.mask_jpeg(tmp_path)
    image = fx.write_png_grey(tmp_path / "img.png", (np.arange(32 * 32) % 200).astype(np.uint8).reshape(32, 32))[0]
    root = _dataset(tmp_path, image, mask, {"lesion": 1})
    with pytest.warns(MedsegNotice, match="binarised at grey value 127.5"):
        assert _problems(root) == []
        _, label = load_case(open_dataset(root).cases[0])
    assert label is not None and sorted(np.unique(label).tolist()) == [0, 1]
    assert int(label.sum()) == 16 * 14  # the square drawn, edges and all


def test_jpeg_ground_truth_not_scored(tmp_path: Path) -> None:
    """Scored, every grey value at the mask's edges would be a class of its own."""
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    mask = makers.mask_jpeg(tmp_path / "gt")
    save(Image((load(mask).array > 127).astype(np.uint8)), tmp_path / "pred" / "mask.png")
    result = run_cli("evaluate", tmp_path / "pred", tmp_path / "gt", "-o", tmp_path / "eval")
    assert_one_error_line(result, "mask.jpg", "lossy", "re-export it as PNG")
    assert not (tmp_path / "eval").exists()


def test_one_slice_label_for_2d_image(tmp_path: Path) -> None:
    from medseg.data import open_dataset
    from medseg.data.cases import load_case

    image = makers.png_image_12x16(tmp_path)
    root = _dataset(tmp_path, image, makers.label_one_slice_volume(tmp_path), {"lesion": 1})
    with pytest.warns(MedsegNotice, match=r"read as \(12, 16\)"):
        assert _problems(root) == []
        loaded, label = load_case(open_dataset(root).cases[0])
    assert label is not None and label.shape == loaded.shape == (12, 16) and int(label.sum()) == 48


def test_npy_mask_h_w_1(tmp_path: Path) -> None:
    with pytest.warns(MedsegNotice, match="read as 2D"):
        image = load(makers.npy_mask_h_w_1(tmp_path))
    assert image.shape == (12, 16) and image.ndim == 2


# ---- what info shows ----------------------------------------------------------------------------------------


def test_info_4d_cine(tmp_path: Path) -> None:
    path = makers.nifti_4d_cine(tmp_path)
    result = run_cli("info", path)
    assert result.exit_code == 0 and "5 (4D; frame 0 shown" in result.stdout, result.output
    assert load(path, frame=3).array.max() == 3 and load(path, frame=3).shape == (4, 5, 6)
    assert "--frame" in load_error(path)


def test_info_nan_counted(tmp_path: Path) -> None:
    result = run_cli("info", makers.nifti_with_nan(tmp_path))
    assert result.exit_code == 0, result.output
    assert "4 voxels (3 NaN, 1 inf" in result.stdout


def test_info_alpha_opaque(tmp_path: Path) -> None:
    result = run_cli("info", makers.rgba_png(tmp_path, opaque=True))
    assert result.exit_code == 0 and "dropped; it was opaque" in result.stdout, result.output


def test_info_alpha_not_opaque(tmp_path: Path) -> None:
    result = run_cli("info", makers.rgba_png(tmp_path, opaque=False))
    assert result.exit_code == 0 and "dropped; 10 pixels were not opaque" in result.stdout, result.output


def test_info_sform_qform_disagree(tmp_path: Path) -> None:
    path = makers.nifti_sform_qform_disagree(tmp_path)
    image = load(path)
    assert image.meta["nifti_transform"] == "qform"  # what ITK reads (nibabel would take the sform)
    assert image.geometry.origin[0] == pytest.approx(0.0)
    result = run_cli("info", path)
    assert result.exit_code == 0 and "sform and qform differ by up to 10 mm; the qform is used" in result.stdout


def test_truncated_nifti(tmp_path: Path) -> None:
    path = makers.truncated_nifti(tmp_path)
    assert "truncated" in load_error(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_one_error_line(run_cli("info", path), "truncated")


@pytest.mark.parametrize(("vox_offset", "compressed"), [(0, False), (0, True), (348, False)])
def test_nifti_vox_offset_inside_the_header(tmp_path: Path, vox_offset: int, compressed: bool) -> None:
    """nibabel would show the header's bytes as voxels (offset 0), ITK the data shifted by 4 bytes: refused."""
    path = makers.nifti_vox_offset_zero(tmp_path, vox_offset, compressed)
    assert f"vox_offset {vox_offset} is invalid for a single-file NIfTI (at least 352" in load_error(path)
    assert_one_error_line(run_cli("info", path), str(path), "readers disagree on where its voxels start")
