"""NIfTI, NRRD, MetaImage and DICOM through SimpleITK (which handles their geometry conventions)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from medseg.errors import MedsegError, notice
from medseg.io.dicom_multiframe import is_enhanced_multiframe, read_multiframe
from medseg.io.dicom_series import check_series, choose_series, correct_tilt, list_series
from medseg.io.dicom_source import dicom_files
from medseg.io.image import Geometry, Image
from medseg.io.limits import check_voxels
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


def read_file(path: Path, fmt: str, frame: int | None = None) -> Image:
    """Read a NIfTI, NRRD, MetaImage or single DICOM file; of a 4D file, volume ``frame`` only.

    Raises:
        MedsegError: unreadable or damaged, a declared size over `medseg.io.limits.max_voxels` (checked before
            the voxels are read), a 4D file without ``frame`` (`FourDimensionalError`), ``frame`` out of range.
    """
    if fmt == "nifti":
        return _read_nifti(path, frame)
    if fmt == "dicom" and is_enhanced_multiframe(path):  # GDCM would stack its frames in file order
        return read_multiframe(path)
    reader = _header(path, f"{fmt} file")
    size = tuple(reader.GetSize())
    if len(size) == 4:
        index = _frame_index(size, frame, path)
        reader.SetExtractIndex((0, 0, 0, index))
        reader.SetExtractSize((*size[:3], 0))  # a size of 0 drops the time axis
    with captured_stderr() as printed:
        try:
            img = reader.Execute()
        except RuntimeError as err:
            raise MedsegError(f"cannot read {fmt} file ({_reason(err, printed)})", path) from None
    meta: dict[str, Any] = {"format": fmt, "path": str(path)}
    if len(size) == 4 and size[3] > 1:
        meta.update(frames=size[3], frame=_frame_index(size, frame, path))
    if fmt == "dicom":
        meta["dicom_source"] = str(path)  # what a DICOM-SEG of a label map on this grid references
        meta.update(_dicom_meta(img))  # before slicing, which drops the metadata dictionary
    if img.GetDimension() == 3 and img.GetSize()[2] == 1 and fmt == "dicom":
        img = img[:, :, 0]  # a single DICOM file is one 2D slice
    return from_sitk(img, meta)


class FourDimensionalError(MedsegError):
    """A 4D file (a time series, cine, several echoes) read without naming a frame; ``frames`` counts them."""

    def __init__(self, size: tuple[int, ...], path: Path) -> None:
        super().__init__(
            f"4D image of size {size} ({size[3]} frames); pick one volume (--frame 0 to {size[3] - 1} on info, "
            "predict and prompt; elsewhere save it as its own file)",
            path,
        )
        self.frames = size[3]


def _header(path: Path, what: str) -> sitk.ImageFileReader:
    """An ITK reader of ``path`` with its header read, the declared size checked against the voxel limit
    before any voxel is read, and an empty size refused (``what`` names the file in the errors)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    with captured_stderr() as printed:
        try:
            reader.ReadImageInformation()
        except RuntimeError as err:
            raise MedsegError(f"cannot read {what} ({_reason(err, printed)})", path) from None
    size = tuple(reader.GetSize())
    check_voxels((*size, reader.GetNumberOfComponents()), path)
    if 0 in size:
        raise MedsegError(f"empty image (size {size})", path)
    return reader


def _frame_index(size: tuple[int, ...], frame: int | None, path: Path) -> int:
    if frame is None and size[3] == 1:  # a 3D volume stored with a time axis of one
        return 0
    if frame is None:
        raise FourDimensionalError(size, path)
    if not 0 <= frame < size[3]:  # no counting from the end: -1 is a typo as often as "the last"
        raise MedsegError(
            f"--frame {frame} is out of range: the file holds {size[3]} frames, numbered 0 to {size[3] - 1}", path
        )
    return frame


# NIfTI header extensions (between the header and the voxels) beyond this are refused unread.
MAX_NIFTI_EXTENSION_BYTES = 64 * 1024 * 1024


def _check_nifti_header(path: Path) -> None:
    """Check a NIfTI header's declared size, and its extensions, before nibabel or ITK read them.

    Both libraries read the header extensions whole (a gzip of a few MB can declare 2 GB of them) and then
    allocate the declared voxels; here at most `MAX_NIFTI_EXTENSION_BYTES` are inflated. An uncompressed file
    shorter than its header says is refused without reading it, and so is a single-file NIfTI whose vox_offset
    points into its header (0 by some writers; the standard asks 352 or more): nibabel then reads the header
    bytes as voxels and ITK starts at byte 348, so neither reads the data.
    """
    import gzip

    import nibabel as nib

    compressed = path.name.lower().endswith(".gz")
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as f:
            raw = f.read(540)
            if len(raw) < 348:
                raise MedsegError(f"file is truncated or corrupt (header of {len(raw)} bytes)", path)
            klass = nib.Nifti2Header if raw[:4] in (b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c") else nib.Nifti1Header
            magic = raw[4:8] if klass is nib.Nifti2Header else raw[344:348]
            if magic[:3] not in (b"n+1", b"ni1", b"n+2", b"ni2"):
                return  # not NIfTI: ITK's header reader (348 bytes) names the problem
            size = klass.template_dtype.itemsize
            header = klass(raw[:size], check=False)
            shape = tuple(int(d) for d in header.get_data_shape())
            check_voxels(shape, path)
            vox_offset = int(header["vox_offset"])
            if magic[:3] in (b"n+1", b"n+2") and vox_offset < klass.single_vox_offset:
                # nibabel would read from byte 0 (the header as voxels), ITK from byte 348: neither is the data
                raise MedsegError(
                    f"header's vox_offset {vox_offset} is invalid for a single-file NIfTI (at least "
                    f"{klass.single_vox_offset}, after the header): readers disagree on where its voxels start",
                    path,
                )
            if vox_offset > size + 4 + MAX_NIFTI_EXTENSION_BYTES:
                raise MedsegError(
                    f"header places the voxels {vox_offset:.3g} bytes in: more header extensions than medseg reads",
                    path,
                )
            if raw[size : size + 1] not in (b"", b"\x00"):  # extensions: each must end before the voxels
                f.seek(size + 4)
                position = size + 4
                swap = header.endianness != nib.volumeutils.native_code
                while position + 8 <= vox_offset:
                    head = np.frombuffer(f.read(8), dtype=np.int32)
                    if head.size < 2:
                        break
                    esize = int(head.byteswap()[0] if swap else head[0])
                    if esize < 16 or position + esize > vox_offset:
                        raise MedsegError(f"header extension of {esize} bytes runs past the voxel data", path)
                    f.seek(position + esize)
                    position += esize
    except MedsegError:
        raise
    except Exception as err:  # gzip, zlib and nibabel raise many types for damaged headers
        detail = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise MedsegError(f"file is truncated or corrupt ({detail})", path) from None
    if not compressed:
        needed = vox_offset + int(np.prod(shape, dtype=np.float64)) * header.get_data_dtype().itemsize
        if path.stat().st_size < needed:
            raise MedsegError(
                f"file is truncated or corrupt ({path.stat().st_size} bytes, the header declares {needed})", path
            )


def _read_nifti(path: Path, frame: int | None = None) -> Image:
    """Geometry as SimpleITK interprets the header; voxels from nibabel.

    nibabel is used for the voxels because ITK's NIfTI reader silently turns NaN/inf into 0 and
    fills a truncated file's missing voxels with zeros; nibabel keeps the former and refuses the latter.
    """
    import nibabel as nib

    _check_nifti_header(path)
    reader = _header(path, "NIfTI header")
    ndim, size = reader.GetDimension(), tuple(reader.GetSize())
    if ndim > 4:
        raise MedsegError(f"{ndim}D image of size {size} is not supported", path)
    meta: dict[str, Any] = {"format": "nifti", "path": str(path)}
    index = None
    if ndim == 4:
        index = _frame_index(size, frame, path)
        if size[3] > 1:
            meta.update(frames=size[3], frame=index)
    if reader.GetNumberOfComponents() > 1:  # vector pixels: SimpleITK reads them as channels
        if index is not None:
            reader.SetExtractIndex((0, 0, 0, index))
            reader.SetExtractSize((*size[:3], 0))
        with captured_stderr():
            return from_sitk(reader.Execute(), meta)
    try:
        nii = nib.load(str(path))
        proxy = nii.dataobj  # type: ignore[attr-defined]
        data = np.asarray(proxy if index is None else proxy[..., index])
    except Exception as err:  # nibabel raises EOFError, ValueError, zlib.error... for damaged files
        detail = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise MedsegError(f"file is truncated or corrupt ({detail})", path) from None
    size = size[:3] if index is not None else size
    if data.size != int(np.prod(size)):
        raise MedsegError(f"header size {size} does not match the voxel data shape {data.shape}", path)
    if data.dtype == np.float64 and nii.get_data_dtype() != np.float64:  # type: ignore[attr-defined]
        data = data.astype(np.float32)  # scaled integers: float32 holds them, as SimpleITK gives
    array = np.ascontiguousarray(data.reshape(size, order="F").T)  # (x, y, z) -> (z, y, x)
    spacing, origin, direction = reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()
    if index is not None:  # the spatial part of ITK's 4D geometry
        d = np.asarray(direction).reshape(4, 4)[:3, :3]
        spacing, origin, direction = spacing[:3], origin[:3], tuple(d.ravel().tolist())
    geometry = Geometry(tuple(spacing), tuple(origin), tuple(direction))
    meta.update(_nifti_transform(nii, geometry))
    return Image(array, geometry, meta=meta)


def _nifti_transform(nii: Any, geometry: Geometry) -> dict[str, Any]:
    """Which of the header's transforms places the voxels (the one ITK's reading matches), and whether sform
    and qform disagree: tools differ in which they prefer (nibabel the sform, ITK often the qform)."""
    header = nii.header
    codes = {"sform": int(header["sform_code"]), "qform": int(header["qform_code"])}
    d = len(geometry.spacing)
    itk = np.eye(4)
    itk[:d, :d] = geometry.direction_matrix() * np.asarray(geometry.spacing)[None, :]
    itk[:d, 3] = geometry.origin
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])  # NIfTI's RAS+ to ITK's LPS
    forms = {name: lps @ (header.get_sform() if name == "sform" else header.get_qform()) for name in codes}
    matching = [n for n in ("sform", "qform") if codes[n] > 0 and np.allclose(forms[n][:d], itk[:d], atol=1e-3)]
    used = matching[0] if matching else ("none (pixel dimensions only)" if not any(codes.values()) else "?")
    out: dict[str, Any] = {"nifti_transform": used}
    if codes["sform"] > 0 and codes["qform"] > 0:
        worst = float(np.max(np.abs(forms["sform"] - forms["qform"])))
        if worst > 1e-3:
            out["nifti_transform_conflict"] = (
                f"sform and qform differ by up to {worst:.4g} mm; the {used} is used (as ITK reads it)"
            )
    return out


def read_dicom_series(folder: Path, series: str | None = None) -> Image:
    """Read one DICOM series of ``folder``: slices sorted by position, rescale slope/intercept applied (a float
    array when the rescaled values are not integers, `medseg.io.dicom_series.check_series`).

    Args:
        folder: the folder.
        series: its SeriesNumber or SeriesInstanceUID, needed when the folder holds several series.

    Raises:
        MedsegError: no series; several series and no ``series`` (they are listed); unreadable slices; as
            `medseg.io.dicom_series.check_series` (size, positions, gaps, tilt).
    """
    with captured_stderr() as printed:
        try:
            series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        except RuntimeError as err:
            raise MedsegError(f"cannot scan folder for DICOM ({_reason(err, printed)})", folder) from None
    if not series_ids:
        raise MedsegError("folder holds no DICOM series (and is not a file medseg reads)", folder)
    candidates = dicom_files(folder)
    summaries = list_series(candidates)
    chosen = choose_series(summaries, series, folder)
    if chosen.uid not in series_ids:
        raise MedsegError(f"series {chosen.describe()} holds no image GDCM can read", folder)
    multiframe = [f for f in chosen.files if is_enhanced_multiframe(f)]
    if multiframe and len(chosen.files) == 1:
        image = read_multiframe(chosen.files[0])
        image.meta["path"] = image.meta["dicom_source"] = str(folder)
        return image
    if multiframe:
        raise MedsegError(
            f"series {chosen.describe()} holds {len(multiframe)} multi-frame files among {len(chosen.files)} "
            "(several stacks or time points?): read one file at a time",
            folder,
        )
    # GDCM orders the files by their position along the slice normal.
    with captured_stderr():
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), chosen.uid)
    # GDCM silently leaves out files it cannot parse: a missing slice would shift the volume.
    in_series = {Path(f).name for f in files}
    in_other_series = {f.name for s in summaries if s is not chosen for f in s.files}
    left_out = [p for p in candidates if p.name not in in_series and p.name not in in_other_series]
    if left_out:
        raise MedsegError(
            f"{len(left_out)} file(s) in the series folder are not readable DICOM slices (first: {left_out[0].name})",
            folder,
        )
    checked = check_series([Path(f) for f in files], folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    if checked.float_values:  # every slice rescaled by its own slope/intercept into floats
        reader.SetOutputPixelType(sitk.sitkFloat32)
    with captured_stderr() as printed:
        try:
            img = reader.Execute()
        except RuntimeError as err:
            raise MedsegError(f"cannot read DICOM series ({_reason(err, printed)})", folder) from None
    meta: dict[str, Any] = {"format": "dicom", "path": str(folder), "dicom_files": len(files)}
    meta["dicom_source"] = str(folder)  # what a DICOM-SEG of a label map on this grid references
    meta["rescale"] = checked.rescale
    for key, name in _DICOM_TAGS.items():
        if reader.HasMetaDataKey(0, key):
            meta[name] = reader.GetMetaData(0, key).strip()
    if len(files) == 1 and img.GetDimension() == 3 and img.GetSize()[2] == 1:
        img = img[:, :, 0]
    if checked.tilt is None:
        return from_sitk(img, meta)
    tilt = checked.tilt
    if not np.allclose(img.GetOrigin(), tilt.first, atol=1e-3):  # GDCM's slice order is not the positions'
        raise MedsegError("tilted series whose slice order GDCM and medseg disagree on: not corrected", folder)
    array = correct_tilt(sitk.GetArrayFromImage(img), tilt)
    meta["gantry_tilt"] = f"{tilt.degrees:.2f} degrees, resampled onto an orthogonal grid (linear, as dcm2niix)"
    notice(
        f"slices sheared {tilt.degrees:.2f} degrees against their normal (gantry tilt): resampled onto an "
        "orthogonal grid (linear interpolation, as dcm2niix does); label maps are on that grid",
        folder,
    )
    meta.pop("dicom_source")  # a DICOM-SEG cannot reference the acquired slices from the resampled grid
    return Image(array, tilt.geometry, meta=meta)


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
