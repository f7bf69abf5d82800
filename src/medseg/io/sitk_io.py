"""NIfTI, NRRD, MetaImage and DICOM through SimpleITK (which handles their geometry conventions)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from medseg.errors import MedsegError
from medseg.io.image import Geometry, Image
from medseg.io.quiet import captured_stderr

# ITK prints multi-line warnings to stderr (e.g. on uneven DICOM slices); medseg reports problems itself.
sitk.ProcessObject.SetGlobalWarningDisplay(False)

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
    elif array.dtype == np.float16:  # SimpleITK has no half floats; float32 holds them exactly
        array = array.astype(np.float32)
    img = sitk.GetImageFromArray(array, isVector=image.channels > 1)
    img.SetSpacing(image.geometry.spacing)
    img.SetOrigin(image.geometry.origin)
    img.SetDirection(image.geometry.direction)
    return img


def read_file(path: Path, fmt: str) -> Image:
    """Read a NIfTI, NRRD, MetaImage or single DICOM file."""
    if fmt == "nifti":
        return _read_nifti(path)
    with captured_stderr() as printed:
        try:
            img = sitk.ReadImage(str(path))
        except RuntimeError as err:
            raise MedsegError(f"cannot read {fmt} file ({_reason(err, printed)})", path) from None
    if img.GetDimension() == 4:
        raise MedsegError(f"4D image of size {img.GetSize()} is not supported", path)
    meta: dict[str, Any] = {"format": fmt, "path": str(path)}
    if fmt == "dicom":
        meta["dicom_source"] = str(path)  # what a DICOM-SEG of a label map on this grid references
        meta.update(_dicom_meta(img))  # before slicing, which drops the metadata dictionary
    if img.GetDimension() == 3 and img.GetSize()[2] == 1 and fmt == "dicom":
        img = img[:, :, 0]  # a single DICOM file is one 2D slice
    return from_sitk(img, meta)


def _read_nifti(path: Path) -> Image:
    """Geometry as SimpleITK interprets the header; voxels from nibabel.

    nibabel is used for the voxels because ITK's NIfTI reader silently turns NaN/inf into 0 and
    fills a truncated file's missing voxels with zeros; nibabel keeps the former and refuses the latter.
    """
    import nibabel as nib

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    with captured_stderr() as printed:
        try:
            reader.ReadImageInformation()
        except RuntimeError as err:
            raise MedsegError(f"cannot read NIfTI header ({_reason(err, printed)})", path) from None
    ndim, size = reader.GetDimension(), tuple(reader.GetSize())
    if ndim == 4:
        raise MedsegError(f"4D image of size {size} is not supported", path)
    if 0 in size:
        raise MedsegError(f"empty image (size {size})", path)
    meta: dict[str, Any] = {"format": "nifti", "path": str(path)}
    if reader.GetNumberOfComponents() > 1:  # vector pixels: SimpleITK reads them as channels
        with captured_stderr():
            return from_sitk(sitk.ReadImage(str(path)), meta)
    try:
        nii = nib.load(str(path))
        data = np.asarray(nii.dataobj)  # type: ignore[attr-defined]
    except Exception as err:  # nibabel raises EOFError, ValueError, zlib.error... for damaged files
        detail = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise MedsegError(f"file is truncated or corrupt ({detail})", path) from None
    if data.size != int(np.prod(size)):
        raise MedsegError(f"header size {size} does not match the voxel data shape {data.shape}", path)
    if data.dtype == np.float64 and nii.get_data_dtype() != np.float64:  # type: ignore[attr-defined]
        data = data.astype(np.float32)  # scaled integers: float32 holds them, as SimpleITK gives
    array = np.ascontiguousarray(data.reshape(size, order="F").T)  # (x, y, z) -> (z, y, x)
    geometry = Geometry(tuple(reader.GetSpacing()), tuple(reader.GetOrigin()), tuple(reader.GetDirection()))
    return Image(array, geometry, meta=meta)


def read_dicom_series(folder: Path) -> Image:
    """Read the one DICOM series in ``folder``: slices sorted by position, rescale slope/intercept applied.

    Raises:
        MedsegError: no series, several series, or unreadable slices.
    """
    with captured_stderr() as printed:
        try:
            series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        except RuntimeError as err:
            raise MedsegError(f"cannot scan folder for DICOM ({_reason(err, printed)})", folder) from None
    if not series:
        raise MedsegError("folder holds no DICOM series (and is not a file medseg reads)", folder)
    if len(series) > 1:
        raise MedsegError(f"folder holds {len(series)} DICOM series ({', '.join(series)}); pass one per folder", folder)
    # GDCM orders the files by their position along the slice normal.
    with captured_stderr():
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    # GDCM silently leaves out files it cannot parse: a missing slice would shift the volume.
    in_series = {Path(f).name for f in files}
    left_out = [
        p
        for p in sorted(folder.iterdir())
        if p.is_file()
        and not p.name.startswith(".")
        and p.suffix.lower() in ("", ".dcm", ".ima")
        and p.name not in in_series
        and p.name.upper() != "DICOMDIR"
    ]
    if left_out:
        raise MedsegError(
            f"{len(left_out)} file(s) in the series folder are not readable DICOM slices (first: {left_out[0].name})",
            folder,
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    with captured_stderr() as printed:
        try:
            img = reader.Execute()
        except RuntimeError as err:
            raise MedsegError(f"cannot read DICOM series ({_reason(err, printed)})", folder) from None
    _check_slice_spacing(reader, len(files), folder)
    meta: dict[str, Any] = {"format": "dicom", "path": str(folder), "dicom_files": len(files)}
    meta["dicom_source"] = str(folder)  # what a DICOM-SEG of a label map on this grid references
    for key, name in _DICOM_TAGS.items():
        if reader.HasMetaDataKey(0, key):
            meta[name] = reader.GetMetaData(0, key).strip()
    if len(files) == 1 and img.GetDimension() == 3 and img.GetSize()[2] == 1:
        img = img[:, :, 0]
    return from_sitk(img, meta)


def _check_slice_spacing(reader: sitk.ImageSeriesReader, count: int, folder: Path) -> None:
    """Slices must have a position (else their order and the z spacing are guesses) and be evenly spaced along
    their normal (a gap means missing files and a wrong z spacing)."""
    if count < 2:
        return
    unplaced = [i for i in range(count) if not reader.HasMetaDataKey(i, "0020|0032")]
    if unplaced:
        name = Path(reader.GetFileNames()[unplaced[0]]).name
        raise MedsegError(f"slice file {name!r} has no ImagePositionPatient (0020,0032): the slices' order and "
                          f"spacing are unknown ({len(unplaced)} of {count} slices lack it)", folder)  # fmt: skip
    if count < 3:
        return
    try:
        cosines = np.array([float(v) for v in reader.GetMetaData(0, "0020|0037").split("\\")])
        positions = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")] for i in range(count)])
    except (RuntimeError, ValueError):
        return  # malformed tags: SimpleITK's own geometry stands
    normal = np.cross(cosines[:3], cosines[3:6])
    steps = np.diff(positions @ normal)
    typical = float(np.median(np.abs(steps)))
    worst = int(np.argmax(np.abs(np.abs(steps) - typical)))
    if typical == 0 or abs(abs(steps[worst]) - typical) > max(0.01, 0.01 * typical):
        raise MedsegError(
            f"DICOM slices are not evenly spaced: {abs(steps[worst]):.4g} mm between slices {worst} and {worst + 1} "
            f"where most are {typical:.4g} mm apart (missing or duplicate slices?)",
            folder,
        )


def write(image: Image, path: Path) -> None:
    """Write NIfTI/NRRD/MetaImage (compressed where the format allows)."""
    with captured_stderr() as printed:
        try:
            sitk.WriteImage(to_sitk(image), str(path), useCompression=True)
        except RuntimeError as err:
            raise OSError(_reason(err, printed)) from None


def _dicom_meta(img: sitk.Image) -> dict[str, Any]:
    return {name: img.GetMetaData(key).strip() for key, name in _DICOM_TAGS.items() if img.HasMetaDataKey(key)}


def _reason(err: Exception, printed: list[str]) -> str:
    """The most useful sentence of an ITK exception, or of what the C library printed instead."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    # ITK messages end with the useful sentence; earlier lines are file/line noise.
    useful = [ln for ln in lines if not ln.startswith(("/", "itk::", "Exception thrown"))]
    reason = useful[-1] if useful else (lines[-1] if lines else type(err).__name__)
    if printed and ("No such file" in reason or "Could not create IO object" in reason):
        reason = printed[-1]  # MetaIO/nifticlib say what is wrong only on stderr
    return reason[:200]
