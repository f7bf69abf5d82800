"""File makers of the corpus: each writes one small synthetic file (or folder) into a folder and returns its path.

Every file is made by code here (none is committed); the hostile ones are a few KB to about 2 MB on disk and
declare sizes of gigabytes. `CASES` in ``cases.py`` pairs each maker with its source report and the right
behaviour.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

import fixtures as fx

# --------------------------------------------------------------------------------------------------
# hostile sizes


def _nifti_header(shape: tuple[int, ...], dtype: type, vox_offset: int = 352) -> bytes:
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = vox_offset
    header.set_sform(np.eye(4), code=1)
    return header.binaryblock


def nifti_claims_1e9_voxels(folder: Path) -> Path:
    """A 1.3 KB .nii whose header declares 1000 x 1000 x 1000 int16 voxels (2 GB)."""
    path = folder / "claims_1e9.nii"
    path.write_bytes(_nifti_header((1000, 1000, 1000), np.int16) + b"\0" * 4 + b"\1" * 1000)
    return path


def gzip_bomb_nifti(folder: Path) -> Path:
    """A 2 MB .nii.gz that inflates to 2.2 GB of zeros, all of them declared voxels (1300^3 uint8).

    Written as concatenated gzip members (one per 16 MiB of zeros, compressed once): gzip readers inflate
    them as one stream, and making the file costs milliseconds.
    """
    path = folder / "bomb.nii.gz"
    zeros = gzip.compress(b"\0" * (16 << 20), compresslevel=9)
    with open(path, "wb") as f:
        f.write(gzip.compress(_nifti_header((1300, 1300, 1300), np.uint8) + b"\0" * 4))
        for _ in range((1300**3) // (16 << 20) + 1):
            f.write(zeros)
    return path


def gzip_bomb_behind_small_nifti(folder: Path) -> Path:
    """A .nii.gz whose header declares 10^3 voxels, followed by 2.2 GB of inflated zeros (trailing data)."""
    path = folder / "small_then_bomb.nii.gz"
    zeros = gzip.compress(b"\0" * (16 << 20), compresslevel=9)
    with open(path, "wb") as f:
        f.write(gzip.compress(_nifti_header((10, 10, 10), np.uint8) + b"\0" * 4 + b"\7" * 1000))
        for _ in range(131):
            f.write(zeros)
    return path


def nifti_extension_bomb(folder: Path) -> Path:
    """A .nii.gz whose header extension claims 2 GB (esize 2e9, voxels placed 2 GB in), inflating to zeros."""
    path = folder / "extension_bomb.nii.gz"
    esize = 2_000_000_000
    header = _nifti_header((4, 4, 4), np.uint8, vox_offset=352 + esize)
    zeros = gzip.compress(b"\0" * (16 << 20), compresslevel=9)
    with open(path, "wb") as f:
        f.write(gzip.compress(header + b"\1\0\0\0" + struct.pack("<ii", esize, 0)))
        for _ in range(esize // (16 << 20) + 1):
            f.write(zeros)
    return path


def _dicom(path: Path, rows: int, columns: int, frames: int = 1, pixel_bytes: int = 8) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CT"
    ds.Rows, ds.Columns = rows, columns
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1, 1]
    ds.PixelData = b"\0" * pixel_bytes
    ds.save_as(path, enforce_file_format=True)
    return path


def dicom_rows_60000(folder: Path) -> Path:
    """An 8 KB-ish DICOM slice declaring Rows = Columns = 60000 (7.2 GB of pixels)."""
    return _dicom(folder / "rows60000.dcm", 60000, 60000)


def dicom_100000_frames(folder: Path) -> Path:
    """A multi-frame DICOM declaring 100000 frames of 512 x 512."""
    return _dicom(folder / "frames.dcm", 512, 512, frames=100000)


def dicom_series_rows_30000(folder: Path) -> Path:
    """A folder of 3 DICOM slices of one series, each declaring Rows = Columns = 30000."""
    series = folder / "huge_series"
    series.mkdir()
    for k in range(3):
        _dicom(series / f"s{k}.dcm", 30000, 30000)
    from pydicom import dcmread

    uid = dcmread(series / "s0.dcm").SeriesInstanceUID
    for k in range(3):  # one series, stacked along z
        ds = dcmread(series / f"s{k}.dcm")
        ds.SeriesInstanceUID, ds.ImagePositionPatient = uid, [0, 0, float(k)]
        ds.save_as(series / f"s{k}.dcm")
    return series


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(folder: Path, side: int = 60000) -> Path:
    """A 1 KB PNG whose header declares ``side`` x ``side`` grey pixels."""
    path = folder / f"bomb{side}.png"
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (side + 1) * 8)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    )
    return path


def nrrd_header_huge(folder: Path) -> Path:
    """An NRRD whose header declares 2000^3 shorts, gzip-encoded, with a few bytes of data."""
    path = folder / "huge.nrrd"
    header = (
        "NRRD0004\ntype: short\ndimension: 3\nsizes: 2000 2000 2000\nencoding: gzip\nendian: little\n"
        "space: left-posterior-superior\nspace directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)\n\n"
    )
    path.write_bytes(header.encode() + gzip.compress(b"\0" * 64))
    return path


def mha_header_huge(folder: Path) -> Path:
    """A MetaImage whose header declares 2000^3 shorts, with a few bytes of data."""
    path = folder / "huge.mha"
    header = (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        "DimSize = 2000 2000 2000\nElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    )
    path.write_bytes(header.encode() + b"\0" * 64)
    return path


def npy_header_huge(folder: Path) -> Path:
    """An .npy whose header declares a 100000 x 100000 int16 array, with a few bytes of data."""
    from numpy.lib import format as npy_format

    path = folder / "huge.npy"
    with open(path, "wb") as f:
        npy_format.write_array_header_1_0(f, {"descr": "<i2", "fortran_order": False, "shape": (100000, 100000)})
        f.write(b"\0" * 64)
    return path


# --------------------------------------------------------------------------------------------------
# DICOM geometry and values


def two_series_one_folder(folder: Path) -> Path:
    """Two series (numbers 3 and 4: 'T1 AX' 5 slices, 'T2 AX' 4 slices) written into one folder."""
    import pydicom

    series = folder / "mixed"
    fx.write_dicom_series(series, name_prefix="a")
    fx.write_dicom_series(series, name_prefix="b", n_slices=4, write_order=[2, 0, 3, 1], slice_step=3.0)
    for f in series.iterdir():
        ds = pydicom.dcmread(f)
        first = f.name.startswith("a")
        ds.SeriesNumber, ds.SeriesDescription = (3, "T1 AX") if first else (4, "T2 AX")
        ds.Modality = "MR"
        ds.save_as(f)
    return series


def series_missing_slice(folder: Path) -> Path:
    """An axial series of 6 slices, 2.5 mm apart, with the 4th slice's file deleted."""
    import pydicom

    series = fx.write_dicom_series(folder / "gap", n_slices=6, suffix=".dcm")
    ordered = sorted(series.files, key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    ordered[3].unlink()
    return series.folder


def series_per_slice_rescale(folder: Path) -> Path:
    """A PET-like series whose slices each have their own RescaleSlope (0.37 + 0.11 k) and intercept (-0.5)."""
    import pydicom

    series = fx.write_dicom_series(folder / "pet", n_slices=4, suffix=".dcm")
    for f in series.files:
        ds = pydicom.dcmread(f)
        k = round((float(ds.ImagePositionPatient[2]) - series.positions[0][2]) / 2.5)
        ds.RescaleSlope, ds.RescaleIntercept, ds.Modality = f"{0.37 + 0.11 * k:.2f}", "-0.5", "PT"
        ds.save_as(f)
    return series.folder


def series_gantry_tilt(folder: Path, degrees: float = 12.0) -> Path:
    """An axial CT series of 6 slices 2.5 mm apart whose positions shift 2.5 tan(``degrees``) mm in y per slice
    (a tilted gantry); every pixel holds ``tilt_phantom`` of its physical position (x, y), rounded."""
    import pydicom

    n, rows, columns, origin, spacing = 6, 16, 16, np.array([-40.0, -35.5, 112.0]), (0.7, 0.6)
    shift = 2.5 * np.tan(np.radians(degrees))
    r, c = np.indices((rows, columns))
    pixels = []
    for k in range(n):
        corner = origin + np.array([0.0, k * shift, k * 2.5])
        points = (
            corner
            + c[..., None] * spacing[1] * np.array([1.0, 0, 0])
            + r[..., None] * spacing[0] * np.array([0, 1.0, 0])
        )
        pixels.append(np.round(tilt_phantom(points)))
    series = fx.write_dicom_series(
        folder / "tilt", n_slices=n, pixels=np.array(pixels), slope=1.0, intercept=0.0, suffix=".dcm",
        origin=tuple(origin), pixel_spacing=spacing,
    )  # fmt: skip
    for f in series.files:
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        k = round((z - origin[2]) / 2.5)
        ds.ImagePositionPatient = [f"{x:.6f}", f"{y + k * shift:.6f}", f"{z:.6f}"]
        ds.GantryDetectorTilt = f"{degrees:g}"
        ds.save_as(f)
    return series.folder


def tilt_phantom(points: np.ndarray) -> np.ndarray:
    """A value linear in physical x and y (mm), so that linear interpolation reproduces it exactly."""
    return 5000 + 20 * points[..., 0] + 7 * points[..., 1]


def series_text_position(folder: Path) -> Path:
    """A series where one slice's ImagePositionPatient holds 'abc' instead of a number."""
    import pydicom

    series = fx.write_dicom_series(folder / "textpos", n_slices=4, suffix=".dcm")
    ds = pydicom.dcmread(series.files[2])
    ds.ImagePositionPatient = ["111", "0", "5"]
    ds.save_as(series.files[2])
    data = series.files[2].read_bytes()  # pydicom refuses to write a DS that is no number: patch the bytes
    series.files[2].write_bytes(data.replace(b"111\\0\\5", b"abc\\0\\5", 1))
    return series.folder


def series_two_echoes(folder: Path) -> Path:
    """A dual-echo MR series: two slices (EchoNumbers 1 and 2) at each of 3 positions, one SeriesInstanceUID."""
    import pydicom

    first = fx.write_dicom_series(folder / "echoes", n_slices=3, name_prefix="e1_", suffix=".dcm")
    second = fx.write_dicom_series(folder / "tmp_echo2", n_slices=3, name_prefix="e2_", suffix=".dcm")
    study = pydicom.dcmread(first.files[0]).StudyInstanceUID
    for f in first.files:
        ds = pydicom.dcmread(f)
        ds.EchoNumbers, ds.Modality = 1, "MR"
        ds.save_as(f)
    for f in second.files:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.EchoNumbers, ds.Modality = first.series_uid, study, 2, "MR"
        ds.FrameOfReferenceUID = pydicom.dcmread(first.files[0]).FrameOfReferenceUID
        ds.save_as(first.folder / f.name)
    return first.folder


def ct_series_few_values(folder: Path) -> Path:
    """A CT series whose (rescaled) values are a handful of integers: still an image, not a label map."""
    pixels = np.zeros((3, 16, 16), np.uint16)
    pixels[:, 4:12, 4:12] = 1024
    return fx.write_dicom_series(folder / "ct", n_slices=3, pixels=pixels, slope=1.0, intercept=-1024.0).folder


# --------------------------------------------------------------------------------------------------
# label files and what info shows


def float_labels_near_integers(folder: Path) -> Path:
    """A float32 NIfTI label map whose values are 0, 0.9999 and 2.0002 (resampled, saved as float)."""
    array = np.zeros((4, 6, 6), np.float32)
    array[1:3, 1:4, 1:4] = 0.9999
    array[2, 4, 4] = 2.0002
    return fx.write_nifti(folder / "float_labels.nii.gz", array)


def float_labels_fractional(folder: Path) -> Path:
    """A float label map holding 0.4 and 0.6 (probabilities, not labels)."""
    array = np.zeros((4, 6, 6), np.float32)
    array[1:3, 1:4, 1:4] = 0.4
    array[0, 0, 0] = 0.6
    return fx.write_nifti(folder / "soft.nii.gz", array)


def mask_0_255_png(folder: Path) -> Path:
    """A PNG mask saved as 0/255 (how image editors export a binary mask)."""
    from PIL import Image as PILImage

    array = np.zeros((12, 16), np.uint8)
    array[3:9, 4:12] = 255
    path = folder / "mask255.png"
    PILImage.fromarray(array).save(path)
    return path


def mask_jpeg(folder: Path) -> Path:
    """A binary mask (0/255) saved as JPEG: compression leaves grey values at its edges."""
    from PIL import Image as PILImage

    array = np.zeros((32, 32), np.uint8)
    array[8:24, 6:20] = 255
    path = folder / "mask.jpg"
    PILImage.fromarray(array).save(path, quality=75)
    return path


def label_one_slice_volume(folder: Path) -> Path:
    """A label map for a 12 x 16 PNG image stored as a one-slice NIfTI volume (shape (1, 12, 16))."""
    array = np.zeros((1, 12, 16), np.uint8)
    array[0, 3:9, 4:12] = 1
    return fx.write_nifti(folder / "label_1slice.nii.gz", array, spacing=(1, 1, 1), origin=(0, 0, 0),
                          direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))  # fmt: skip


def npy_mask_h_w_1(folder: Path) -> Path:
    """A mask saved with numpy as (H, W, 1)."""
    path = folder / "mask_hw1.npy"
    array = np.zeros((12, 16, 1), np.uint8)
    array[3:9, 4:12, 0] = 1
    np.save(path, array)
    return path


def nifti_4d_cine(folder: Path) -> Path:
    """A 4D cine NIfTI of 5 frames, frame t filled with t."""
    import nibabel as nib

    data = np.stack([np.full((6, 5, 4), t, np.int16) for t in range(5)], axis=-1)  # (x, y, z, t)
    path = folder / "cine.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def nifti_with_nan(folder: Path) -> Path:
    """A float CT-like NIfTI with 3 NaN voxels and 1 +inf."""
    array = np.linspace(-1000, 1000, 4 * 6 * 6, dtype=np.float32).reshape(4, 6, 6)
    array[0, 0, :3] = np.nan
    array[1, 1, 1] = np.inf
    return fx.write_nifti(folder / "nan.nii.gz", array)


def rgba_png(folder: Path, opaque: bool) -> Path:
    """An RGBA PNG, its alpha all 255 (``opaque``) or with 10 transparent pixels."""
    from PIL import Image as PILImage

    array = np.full((10, 12, 4), 200, np.uint8)
    array[..., 3] = 255
    if not opaque:
        array[0, :10, 3] = 0
    path = folder / f"rgba_{'opaque' if opaque else 'holes'}.png"
    PILImage.fromarray(array, mode="RGBA").save(path)
    return path


def nifti_sform_qform_disagree(folder: Path) -> Path:
    """A NIfTI whose sform (code 2, shifted 10 mm in x) and qform (code 1, identity) disagree."""
    import nibabel as nib

    image = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
    image.set_qform(np.eye(4), code=1)
    sform = np.eye(4)
    sform[:3, 3] = [10, -5, 3]
    image.set_sform(sform, code=2)
    path = folder / "forms.nii.gz"
    nib.save(image, str(path))
    return path


def truncated_nifti(folder: Path) -> Path:
    """A .nii.gz cut in half (an interrupted download)."""
    whole = fx.write_nifti(folder / "whole.nii.gz", np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8))
    path = folder / "half.nii.gz"
    path.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 2])
    whole.unlink()
    return path


def nifti_vox_offset_zero(folder: Path, vox_offset: int = 0, compressed: bool = False) -> Path:
    """A single-file NIfTI (6 x 7 x 8 int16, its voxels at byte 352) whose header says ``vox_offset`` 0: nibabel
    reads the header as voxels, ITK starts at byte 348."""
    data = np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8) + 1
    raw = _nifti_header(data.shape, np.int16, vox_offset=vox_offset) + b"\0" * 4 + data.tobytes(order="F")
    path = folder / f"offset{vox_offset}.nii{'.gz' if compressed else ''}"
    path.write_bytes(gzip.compress(raw) if compressed else raw)
    return path


def png_image_12x16(folder: Path) -> Path:
    """A 12 x 16 grey PNG image (the image the 2D label cases belong to)."""
    from PIL import Image as PILImage

    path = folder / "image.png"
    PILImage.fromarray((np.arange(12 * 16) % 251).astype(np.uint8).reshape(12, 16)).save(path)
    return path


def enhanced_ct_shuffled_frames(folder: Path, duplicate: bool = False) -> tuple[Path, Path]:
    """A Legacy Converted Enhanced CT (one multi-frame file, made by highdicom from a 5-slice series) whose
    frames are stored out of position order, each placed by its Plane Position Sequence; with ``duplicate``,
    a sixth frame repeats the first position (a second time point). Returns (file, the source series folder)."""
    import logging

    import pydicom
    from highdicom import UID
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    series = fx.write_dicom_series(folder / "source", n_slices=5, suffix=".dcm")
    datasets = [pydicom.dcmread(f) for f in series.files]
    logging.getLogger("highdicom").setLevel(logging.ERROR)  # FrameType is not derivable from legacy CT
    converted = LegacyConvertedEnhancedCTImage(
        datasets, series_instance_uid=UID(), series_number=9, sop_instance_uid=UID(), instance_number=1
    )
    path = folder / "enhanced.dcm"
    converted.save_as(path)
    ds = pydicom.dcmread(path)
    order = [2, 0, 4, 1, 3] + ([0] if duplicate else [])
    pixels = ds.pixel_array[order]
    ds.PerFrameFunctionalGroupsSequence = [ds.PerFrameFunctionalGroupsSequence[i] for i in order]
    ds.NumberOfFrames = len(order)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path)
    return path, series.folder
