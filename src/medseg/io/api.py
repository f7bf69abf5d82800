"""`load` and `save`: one entry point for every format, atomic writes, inputs never overwritten."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from medseg.errors import MedsegError, notice
from medseg.io import dicom_seg, dicom_source, numpy_io, raster, sitk_io
from medseg.io.formats import (
    MRC_NOT_WRITTEN,
    NO_GEOMETRY_FORMATS,
    RASTER_FORMATS,
    check_label_target,
    format_of,
    split_extension,
)
from medseg.io.image import Geometry, Image
from medseg.io.paths import check_exists


def load(path: str | Path, *, key: str | None = None, frame: int | None = None, series: str | None = None) -> Image:
    """Read an image or label map with its geometry.

    Args:
        path: a file (.nii/.nii.gz, .nrrd/.nhdr, .mha/.mhd, .dcm, .png/.jpg/.bmp/.tif/.gif,
            .npy/.npz, .mrc) or a folder holding one DICOM series. A DICOM-SEG file (or a folder holding
            only one) reads as its label map (`medseg.io.dicom_seg.read_dicom_seg`).
        key: for .npz files, the array to read (default: ``imgs``, then ``segs``, ``gts``, ...).
        frame: of a 4D NIfTI, NRRD or MetaImage file (a time series, cine), the volume to read (from 0).
        series: of a DICOM folder holding several series, the one to read: its SeriesNumber or
            SeriesInstanceUID (`medseg.io.sitk_io.read_dicom_series`).

    Returns:
        An `Image`; ``meta["format"]`` and ``meta["path"]`` record the source; a DICOM image's
        ``meta["dicom_source"]`` (its series folder or file) stays with label maps made by `Image.with_array`.

    Raises:
        MedsegError: missing/unreadable/truncated file, a symbolic link loop, unknown extension, an empty image,
            a 4D image without ``frame`` (`medseg.io.sitk_io.FourDimensionalError`), a declared size over
            `medseg.io.limits.max_voxels` (checked before reading the voxels), a DICOM-SEG beside the series in
            its folder, several DICOM series without ``series``.
    """
    p = Path(path)
    check_exists(p)
    if not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0)):
        raise MedsegError("permission denied", p)
    try:
        image = _load(p, key, frame, series)
    except OSError as err:  # e.g. an unreadable file inside a DICOM folder, or an I/O error
        raise MedsegError(f"cannot read ({err.strerror or err})", p) from None
    except MemoryError:
        raise MedsegError(
            "not enough memory to read it (set MEDSEG_MAX_VOXELS lower to refuse such files)", p
        ) from None
    if np.iscomplexobj(image.array):  # e.g. MR k-space or phase data: no real intensity to segment
        raise MedsegError(f"complex-valued voxels ({image.array.dtype}) are not supported; save the magnitude", p)
    return image


def _load(p: Path, key: str | None, frame: int | None = None, series: str | None = None) -> Image:
    fmt = format_of(p)
    if p.is_file() and p.stat().st_size == 0:
        raise MedsegError("file is empty (0 bytes)", p)
    if fmt == "dicom" and p.is_dir():
        return _read_dicom_folder(p, series)
    if fmt == "dicom" and dicom_source.is_segmentation(p):
        return dicom_seg.read_dicom_seg(p)
    if fmt in ("nifti", "nrrd", "metaimage", "dicom"):
        return sitk_io.read_file(p, fmt, frame)
    if fmt in RASTER_FORMATS:
        return raster.read(p, fmt)
    if fmt == "npy":
        return numpy_io.read_npy(p)
    if fmt == "npz":
        return numpy_io.read_npz(p, key)
    return numpy_io.read_mrc(p)


def _read_dicom_folder(folder: Path, series: str | None = None) -> Image:
    """A DICOM series, or the label map of the one DICOM-SEG file a folder holds."""
    files = dicom_source.dicom_files(folder)
    if len(files) == 1 and dicom_source.is_segmentation(files[0]):
        return dicom_seg.read_dicom_seg(files[0])
    try:
        return sitk_io.read_dicom_series(folder, series)
    except MedsegError:  # a SEG beside its series makes two series: say so
        segs = [f.name for f in files if dicom_source.is_segmentation(f)]
        if not segs:
            raise
        raise MedsegError(
            f"folder holds a DICOM-SEG ({segs[0]}) beside image slices; keep a series folder to its images "
            "and load the SEG file itself",
            folder,
        ) from None


def save(image: Image, path: str | Path, *, key: str | None = None, protect: tuple[str | Path, ...] = ()) -> Path:
    """Write ``image`` to ``path`` atomically (temporary file in the same folder, then rename).

    The format follows the extension. A label map on an input's grid (`Image.with_array`) keeps that
    input's spacing, origin and direction exactly as read. ``.dcm`` writes a DICOM-SEG that references the
    DICOM series the label map was made on (``image.meta["dicom_source"]``, which `load` sets on a DICOM
    image and `Image.with_array` keeps), with default segment names; `medseg.io.save_dicom_seg` takes the
    series, names and algorithm type explicitly.

    Args:
        image: what to write.
        path: target file; its folder is created if needed.
        key: npz array name; default ``segs`` for label maps and ``imgs`` for images (MedSAM convention).
        protect: paths that must not be overwritten (the inputs); ``image.meta["path"]`` always is.

    Raster formats and ``.npy`` keep no geometry: an image whose spacing, origin or direction is not the
    identity is written without them, with a `medseg.errors.MedsegNotice` saying so.

    Raises:
        MedsegError: the target is an input, the format cannot hold the data (a 3D PNG, a label map as
            JPEG, DICOM output other than a label map made on a DICOM series), or writing fails.
    """
    target = Path(path)
    fmt = format_of(target) if target.suffix else None
    if fmt is None or (target.is_dir() and fmt == "dicom"):
        raise MedsegError("output needs a file extension such as .nii.gz or .png", target)
    protected = {Path(p).resolve() for p in protect}
    if image.meta.get("path"):
        protected.add(Path(image.meta["path"]).resolve())
    if target.resolve() in protected:
        raise MedsegError("refusing to overwrite an input file", target)
    if fmt == "dicom":
        source = image.meta.get("dicom_source")
        if not source or not image.is_label_map():
            raise MedsegError(
                "DICOM is written only as a DICOM-SEG of a label map made on a DICOM series "
                "(medseg.io.save_dicom_seg names the series); write .nii.gz (geometry is kept)",
                target,
            )
        return dicom_seg.save_dicom_seg(image, target, source, protect=tuple(protect))
    if image.is_label_map():
        check_label_target(target, image.ndim)
    elif fmt == "mrc":
        raise MedsegError(MRC_NOT_WRITTEN, target)
    # Write under the final name in a hidden folder next to the target, then move into place: .mhd and
    # .nhdr headers name their data file, which must be moved too (first, so the header never dangles).
    stem = split_extension(target)[0]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{stem}.", suffix=".tmp", dir=target.parent))
    except OSError as err:  # a read-only folder, a full disk
        raise MedsegError(f"cannot write ({err.strerror or err})", target) from None
    tmp = tmp_dir / target.name
    try:
        _write(image, tmp, fmt, key)
        for written in sorted(tmp_dir.iterdir(), key=lambda f: f == tmp):
            os.replace(written, target.parent / written.name)
    except MedsegError as err:
        raise MedsegError(err.problem, target) from None
    except (OSError, RuntimeError) as err:
        raise MedsegError(f"cannot write ({str(err).strip().splitlines()[-1][:160]})", target) from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    if fmt in NO_GEOMETRY_FORMATS and not image.geometry.matches(Geometry.identity(image.geometry.ndim)):
        # the same words for every file: one note per format in a run, not one per case of a batch
        notice(
            f"{fmt.upper()} files keep no spacing, origin or direction: written without the image's (.nii.gz keeps"
            " them)"
        )
    return target


def _write(image: Image, tmp: Path, fmt: str, key: str | None) -> None:
    if fmt in ("nifti", "nrrd", "metaimage"):
        sitk_io.write(image, tmp)
    elif fmt in RASTER_FORMATS:
        raster.write(image, tmp, fmt)
    elif fmt == "npy":
        numpy_io.write_npy(image, tmp)
    else:
        numpy_io.write_npz(image, tmp, key or ("segs" if image.is_label_map() else "imgs"))
