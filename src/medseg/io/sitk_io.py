"""NIfTI, NRRD, MetaImage and DICOM through SimpleITK (which handles their geometry conventions)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from medseg.errors import MedsegError
from medseg.io.image import Geometry, Image

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
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise MedsegError(f"cannot read {fmt} file ({_first_line(err)})", path) from None
    if img.GetDimension() == 4:
        raise MedsegError(f"4D image of size {img.GetSize()} is not supported", path)
    if fmt == "nifti" and (missing := _nifti_truncation(path)):
        raise MedsegError(missing, path)
    meta: dict[str, Any] = {"format": fmt, "path": str(path)}
    if fmt == "dicom":
        meta.update(_dicom_meta(img))  # before slicing, which drops the metadata dictionary
    if img.GetDimension() == 3 and img.GetSize()[2] == 1 and fmt == "dicom":
        img = img[:, :, 0]  # a single DICOM file is one 2D slice
    image = from_sitk(img, meta)
    if fmt == "nifti" and image.array.dtype.kind == "f" and image.channels == 1:
        _restore_nifti_nonfinite(image, path)
    return image


def _restore_nifti_nonfinite(image: Image, path: Path) -> None:
    """Put back the NaN/inf values that ITK's NIfTI reader turns into 0, so checks can see them."""
    import nibabel as nib

    data = np.asarray(nib.load(str(path)).dataobj, dtype=image.array.dtype)  # type: ignore[attr-defined]
    data = data.reshape(data.shape[: image.ndim]).T  # nibabel (x, y, z) -> numpy (z, y, x)
    if data.shape == image.array.shape:
        bad = ~np.isfinite(data)
        if bad.any():
            image.array = np.where(bad, data, image.array)


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
    try:
        img = reader.Execute()
    except RuntimeError as err:
        raise MedsegError(f"cannot read DICOM series ({_first_line(err)})", folder) from None
    _check_slice_spacing(reader, len(files), folder)
    meta: dict[str, Any] = {"format": "dicom", "path": str(folder), "dicom_files": len(files)}
    for key, name in _DICOM_TAGS.items():
        if reader.HasMetaDataKey(0, key):
            meta[name] = reader.GetMetaData(0, key).strip()
    if len(files) == 1 and img.GetDimension() == 3 and img.GetSize()[2] == 1:
        img = img[:, :, 0]
    return from_sitk(img, meta)


def _check_slice_spacing(reader: sitk.ImageSeriesReader, count: int, folder: Path) -> None:
    """Slices must be evenly spaced along their normal: a gap means missing files and a wrong z spacing."""
    if count < 3 or not all(reader.HasMetaDataKey(i, "0020|0032") for i in range(count)):
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
    sitk.WriteImage(to_sitk(image), str(path), useCompression=True)


def _nifti_truncation(path: Path) -> str | None:
    """Why a NIfTI file holds fewer bytes than its header describes, or None.

    ITK reads a truncated file without complaint and fills the missing voxels with zeros.
    """
    head, size = b"", 0
    with open(path, "rb") as f:
        if not path.name.lower().endswith(".gz"):
            head, size = f.read(540), path.stat().st_size
        else:  # count the uncompressed bytes; a truncated stream simply ends early
            inflate = zlib.decompressobj(wbits=31)
            try:
                while chunk := f.read(1 << 20):
                    while chunk:
                        out = inflate.decompress(chunk)
                        head, size, chunk = head + out[: 540 - len(head)], size + len(out), b""
                        if inflate.eof:  # another gzip member may follow
                            chunk, inflate = inflate.unused_data, zlib.decompressobj(wbits=31)
            except zlib.error:
                pass  # trailing garbage after the data: what came before counts
    expected = _nifti_expected_bytes(head)
    if expected is None or size >= expected:
        return None
    return f"file is truncated ({size} of the {expected} bytes its header describes)"


def _nifti_expected_bytes(head: bytes) -> int | None:
    """``vox_offset`` + voxel data size from a NIfTI-1 or NIfTI-2 header (None when unparseable)."""
    for e in "<>":
        if len(head) >= 348 and struct.unpack(e + "i", head[:4])[0] == 348:
            dim, bitpix = struct.unpack(e + "8h", head[40:56]), struct.unpack(e + "h", head[72:74])[0]
            offset = int(struct.unpack(e + "f", head[108:112])[0])
        elif len(head) >= 540 and struct.unpack(e + "i", head[:4])[0] == 540:
            dim, bitpix = struct.unpack(e + "8q", head[16:80]), struct.unpack(e + "h", head[14:16])[0]
            offset = struct.unpack(e + "q", head[168:176])[0]
        else:
            continue
        if not 1 <= dim[0] <= 7 or bitpix <= 0:
            return None
        return offset + (int(np.prod(dim[1 : dim[0] + 1], dtype=np.int64)) * bitpix + 7) // 8
    return None


def _dicom_meta(img: sitk.Image) -> dict[str, Any]:
    return {name: img.GetMetaData(key).strip() for key, name in _DICOM_TAGS.items() if img.HasMetaDataKey(key)}


def _first_line(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    # ITK messages end with the useful sentence; earlier lines are file/line noise.
    useful = [ln for ln in lines if not ln.startswith(("/", "itk::", "Exception thrown"))]
    return (useful[-1] if useful else (lines[-1] if lines else type(err).__name__))[:200]
