"""NIfTI, NRRD, MetaImage and DICOM through SimpleITK (which handles their geometry conventions)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from medseg.errors import MedsegError
from medseg.io.image import Geometry, Image

# DICOM tags copied into Image.meta (no patient identifiers).
_DICOM_TAGS = {
    "0008|0060": "modality",
    "0008|103e": "series_description",
    "0020|000e": "series_instance_uid",
    "0028|1052": "rescale_intercept",
    "0028|1053": "rescale_slope",
    "0018|0050": "slice_thickness",
}


def from_sitk(img: sitk.Image, meta: dict[str, Any]) -> Image:
    """Wrap a SimpleITK image (vector pixels become a trailing channel axis)."""
    array = sitk.GetArrayFromImage(img)
    channels = img.GetNumberOfComponentsPerPixel()
    geometry = Geometry(tuple(img.GetSpacing()), tuple(img.GetOrigin()), tuple(img.GetDirection()))
    return Image(array, geometry, channels=channels, meta=meta)


def to_sitk(image: Image) -> sitk.Image:
    """The SimpleITK image with the same array and geometry."""
    array = image.array
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    img = sitk.GetImageFromArray(array, isVector=image.channels > 1)
    img.SetSpacing(image.geometry.spacing)
    img.SetOrigin(image.geometry.origin)
    img.SetDirection(image.geometry.direction)
    return img


def read_file(path: Path, fmt: str) -> Image:
    """Read a NIfTI, NRRD, MetaImage or single DICOM file."""
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise MedsegError(f"cannot read {fmt} file ({_first_line(err)})", path) from None
    if img.GetDimension() == 4:
        raise MedsegError(f"4D image of size {img.GetSize()} is not supported", path)
    if img.GetDimension() == 3 and img.GetSize()[2] == 1 and fmt == "dicom":
        img = img[:, :, 0]  # a single DICOM file is one 2D slice
    meta: dict[str, Any] = {"format": fmt, "path": str(path)}
    if fmt == "dicom":
        meta.update(_dicom_meta(img))
    return from_sitk(img, meta)


def read_dicom_series(folder: Path) -> Image:
    """Read the one DICOM series in ``folder``: slices sorted by position, rescale slope/intercept applied.

    Raises:
        MedsegError: no series, several series, or unreadable slices.
    """
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as err:
        raise MedsegError(f"cannot scan folder for DICOM ({_first_line(err)})", folder) from None
    if not series:
        raise MedsegError("folder holds no DICOM series (and is not a file medseg reads)", folder)
    if len(series) > 1:
        raise MedsegError(f"folder holds {len(series)} DICOM series ({', '.join(series)}); pass one per folder", folder)
    # GDCM orders the files by their position along the slice normal.
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        img = reader.Execute()
    except RuntimeError as err:
        raise MedsegError(f"cannot read DICOM series ({_first_line(err)})", folder) from None
    meta: dict[str, Any] = {"format": "dicom", "path": str(folder), "dicom_files": len(files)}
    for key, name in _DICOM_TAGS.items():
        if reader.HasMetaDataKey(0, key):
            meta[name] = reader.GetMetaData(0, key).strip()
    if len(files) == 1 and img.GetDimension() == 3 and img.GetSize()[2] == 1:
        img = img[:, :, 0]
    return from_sitk(img, meta)


def write(image: Image, path: Path) -> None:
    """Write NIfTI/NRRD/MetaImage (compressed where the format allows)."""
    sitk.WriteImage(to_sitk(image), str(path), useCompression=True)


def _dicom_meta(img: sitk.Image) -> dict[str, Any]:
    return {name: img.GetMetaData(key).strip() for key, name in _DICOM_TAGS.items() if img.HasMetaDataKey(key)}


def _first_line(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    # ITK messages end with the useful sentence; earlier lines are file/line noise.
    useful = [ln for ln in lines if not ln.startswith(("/", "itk::", "Exception thrown"))]
    return (useful[-1] if useful else (lines[-1] if lines else type(err).__name__))[:200]
