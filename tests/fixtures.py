"""Builders of small synthetic image files for the tests (no real data needed).

Every builder writes into a folder the caller owns (usually pytest's ``tmp_path``) and returns the
path it wrote, plus, where a test needs them, the values it put there. Geometry is given in ITK order
(``spacing (sx, sy, sz)``, LPS ``origin``, row-major ``direction`` whose columns are the index axes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

# --------------------------------------------------------------------------------------------------
# NIfTI

NIFTI_SHAPE = (6, 7, 8)  # numpy order (z, y, x)
NIFTI_SPACING = (0.75, 0.8, 2.5)  # ITK order (sx, sy, sz): anisotropic
NIFTI_ORIGIN = (-12.5, 30.25, 41.0)
# x axis flipped (points to patient right), y and z as in LPS: a "RPS" volume.
FLIPPED_DIRECTION = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def oblique_direction(angle: float = 0.3) -> tuple[float, ...]:
    """A rotation of ``angle`` rad about z combined with a flip of x (determinant -1)."""
    c, s = math.cos(angle), math.sin(angle)
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return tuple((rotation @ np.diag([-1.0, 1.0, 1.0])).ravel().tolist())


def volume_values(shape: tuple[int, ...] = NIFTI_SHAPE, dtype: type = np.int16) -> np.ndarray:
    """A volume whose every voxel is distinct: ``value = 100*z + 10*y + x`` (numpy index)."""
    z, y, x = np.indices(shape)
    return (100 * z + 10 * y + x).astype(dtype)


def write_nifti(
    path: Path,
    array: np.ndarray | None = None,
    spacing: tuple[float, ...] = NIFTI_SPACING,
    origin: tuple[float, ...] = NIFTI_ORIGIN,
    direction: tuple[float, ...] = FLIPPED_DIRECTION,
) -> Path:
    """Write a 3D volume with SimpleITK (independently of medseg), in the format of ``path``'s
    extension (``.nii.gz`` / ``.nii``, also ``.nrrd`` or ``.mha``); default values from `volume_values`,
    anisotropic spacing, non-zero origin and a flipped x axis."""
    array = volume_values() if array is None else array
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def write_nifti_4d(path: Path, shape: tuple[int, ...] = (2, 3, 4, 5)) -> Path:
    """A 4D NIfTI (a time series of ``shape[0]`` volumes), written with nibabel."""
    import nibabel as nib

    data = np.arange(int(np.prod(shape)), dtype=np.int16).reshape(shape)
    # nibabel wants (x, y, z, t)
    nib.save(nib.Nifti1Image(np.transpose(data, (3, 2, 1, 0)), np.eye(4)), str(path))
    return path


# --------------------------------------------------------------------------------------------------
# DICOM


@dataclass(frozen=True)
class DicomSeries:
    """What `write_dicom_series` wrote, in slice (position) order."""

    folder: Path
    files: list[Path]  # files[k] holds slice k (k-th along +z)
    raw: np.ndarray  # stored pixel values, (z, y, x)
    hu: np.ndarray  # raw * slope + intercept
    positions: list[tuple[float, float, float]]  # ImagePositionPatient of slice k
    pixel_spacing: tuple[float, float]  # (row spacing = dy, column spacing = dx)
    series_uid: str
    write_order: list[int]  # slice indices in the order the files were written


def write_dicom_series(
    folder: Path,
    *,
    n_slices: int = 5,
    rows: int = 16,
    cols: int = 16,
    origin: tuple[float, float, float] = (-40.0, -35.5, 112.0),
    slice_step: float = 2.5,
    pixel_spacing: tuple[float, float] = (0.7, 0.6),
    slope: float = 2.0,
    intercept: float = -1024.0,
    write_order: list[int] | None = None,
    suffix: str = "",
    name_prefix: str = "",
    study_uid: str | None = None,
    seed: int = 0,
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    instance_numbers: list[int] | None = None,
    pixels: np.ndarray | None = None,
) -> DicomSeries:
    """Write a CT series (CT Image Storage, explicit VR little endian), one file per slice.

    Slice ``k`` lies at ``origin + k * slice_step * normal``, ``normal = row x column`` of ``orientation``
    (ImageOrientationPatient; default axial, so along z), and holds raw values
    ``1000 + 100*k + 10*(row % 10) + col % 10`` (so every slice is recognisable). The files are written in a
    shuffled order (``write_order``), with names that do not sort in slice order, and ``InstanceNumber``
    follows the writing order (or ``instance_numbers[i]`` for the i-th file written), not the position: only
    the positions give the order. ``pixels`` (uint16, ``(n_slices, rows, cols)``) replaces the raw values.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    order = list(write_order) if write_order is not None else [3, 0, 4, 1, 2][:n_slices]
    if sorted(order) != list(range(n_slices)):
        order = [int(i) for i in rng.permutation(n_slices)]
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_uid = generate_uid()
    r, c = np.indices((rows, cols))
    raw = np.stack([1000 + 100 * k + 10 * (r % 10) + c % 10 for k in range(n_slices)]).astype(np.uint16)
    if pixels is not None:
        raw = np.asarray(pixels, np.uint16).reshape(n_slices, rows, cols)
    normal = np.cross(orientation[:3], orientation[3:6])
    positions = [tuple(float(v) for v in np.asarray(origin) + k * slice_step * normal) for k in range(n_slices)]
    files: list[Path | None] = [None] * n_slices
    for instance, k in enumerate(order, start=1):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "CT"
        ds.SeriesDescription = "synthetic test series"
        ds.PatientName = "Test^Synthetic"
        ds.PatientID = "TEST0001"
        ds.StudyDate = "20240101"
        ds.SeriesNumber = 1
        ds.InstanceNumber = instance if instance_numbers is None else instance_numbers[instance - 1]
        ds.ImagePositionPatient = [f"{v:.10g}" for v in positions[k]]
        ds.ImageOrientationPatient = [f"{v:.10g}" for v in orientation]
        ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
        ds.SliceThickness = f"{slice_step:g}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleType = "HU"
        ds.PixelData = raw[k].tobytes()
        # Names sort neither in slice nor in writing order.
        name = f"{name_prefix}IM{(7919 * (k + 3)) % 1000:03d}{suffix}"
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        files[k] = path
    hu = raw.astype(np.float64) * slope + intercept
    return DicomSeries(
        folder=folder,
        files=[f for f in files if f is not None],
        raw=raw,
        hu=hu,
        positions=positions,
        pixel_spacing=pixel_spacing,
        series_uid=series_uid,
        write_order=order,
    )


# --------------------------------------------------------------------------------------------------
# Raster images


def grey_values(shape: tuple[int, int] = (12, 20)) -> np.ndarray:
    """uint8 grey image, ``value = 10*y + x`` (distinct per pixel)."""
    y, x = np.indices(shape)
    return (10 * y + x).astype(np.uint8)


def write_png_grey(path: Path, array: np.ndarray | None = None) -> tuple[Path, np.ndarray]:
    from PIL import Image as PILImage

    array = grey_values() if array is None else array
    PILImage.fromarray(array).save(path, format="PNG")
    return path, array


def write_png_rgb(path: Path, shape: tuple[int, int] = (12, 20)) -> tuple[Path, np.ndarray]:
    from PIL import Image as PILImage

    grey = grey_values(shape)
    array = np.stack([grey, 255 - grey, (grey.astype(np.int64) * 3) % 256], axis=-1).astype(np.uint8)
    PILImage.fromarray(array).save(path, format="PNG")
    return path, array


def write_png_rgba(path: Path, shape: tuple[int, int] = (12, 20)) -> tuple[Path, np.ndarray]:
    """An RGBA PNG; returns the RGB part (what medseg keeps)."""
    from PIL import Image as PILImage

    grey = grey_values(shape)
    rgba = np.stack([grey, 255 - grey, (grey.astype(np.int64) * 3) % 256, np.full_like(grey, 128)], axis=-1).astype(
        np.uint8
    )
    PILImage.fromarray(rgba).save(path, format="PNG")
    return path, rgba[..., :3]


def label_values(shape: tuple[int, int] = (12, 20), n_labels: int = 4) -> np.ndarray:
    """uint8 label map with ``n_labels`` values (0 = background) in vertical bands."""
    _, x = np.indices(shape)
    return (x * n_labels // shape[1]).astype(np.uint8)


def write_png_palette_labels(path: Path, labels: np.ndarray | None = None) -> tuple[Path, np.ndarray]:
    """A palette ('P' mode) PNG whose palette indices are the labels; the colours are not grey."""
    from PIL import Image as PILImage

    labels = label_values() if labels is None else labels
    pil = PILImage.new("P", (labels.shape[1], labels.shape[0]))
    pil.putdata(labels.ravel().tolist())  # in 'P' mode these are palette indices
    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [255, 255, 0] * 252
    pil.putpalette(palette)
    pil.save(path, format="PNG")
    return path, labels


# --------------------------------------------------------------------------------------------------
# NumPy


def write_medsam_npz_3d(
    path: Path,
    shape: tuple[int, int, int] = (5, 12, 14),
    spacing: tuple[float, float, float] = (0.8, 0.9, 3.0),
) -> tuple[Path, dict[str, np.ndarray]]:
    """A MedSAM-style 3D npz: ``imgs`` (z, y, x) uint8, ``gts`` label map, ``spacing`` in ITK order."""
    imgs = (volume_values(shape, np.int64) % 256).astype(np.uint8)
    gts = np.zeros(shape, np.uint8)
    gts[1:4, 3:8, 4:10] = 1
    gts[2, 8:11, 2:5] = 2
    arrays = {"imgs": imgs, "gts": gts, "spacing": np.asarray(spacing, dtype=np.float64)}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path, arrays


def write_medsam_npz_2d(path: Path, shape: tuple[int, int] = (12, 20)) -> tuple[Path, dict[str, np.ndarray]]:
    """A MedSAM-style 2D npz: ``imgs`` (y, x, 3) uint8 and ``gts`` (y, x)."""
    grey = grey_values(shape)
    imgs = np.stack([grey, grey, grey], axis=-1)
    gts = label_values(shape)
    arrays = {"imgs": imgs, "gts": gts, "spacing": np.asarray((0.5, 0.5))}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path, arrays
