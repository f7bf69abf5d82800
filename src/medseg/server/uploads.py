"""Uploaded label maps: the file's bytes sniffed for their format, checked before they are inflated (a NIfTI
header announcing another voxel count than the image's is refused first), read with `medseg.io.load` and checked
against the image (one channel, its shape and, for formats that carry it, its geometry; the task's labels)."""

from __future__ import annotations

import gzip
import io
import tempfile
from pathlib import Path

import numpy as np

from medseg.errors import MedsegError
from medseg.io import SUPPORTED_EXTENSIONS, load
from medseg.server.workspace import Workspace

_GEOMETRY_FORMATS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def sniff_extension(data: bytes) -> str | None:
    """The file extension the bytes look like (NIfTI, PNG, NPY, NPZ, TIFF, NRRD, BMP), or None."""
    if data[:2] == b"\x1f\x8b":
        return ".nii.gz"
    if nifti_header_size(data) is not None:
        return ".nii"
    for magic, ending in ((b"\x89PNG", ".png"), (b"\x93NUMPY", ".npy"), (b"PK\x03\x04", ".npz"),
                          (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"), (b"NRRD", ".nrrd"), (b"BM", ".bmp")):  # fmt: skip
        if data.startswith(magic):
            return ending
    return None


def nifti_header_size(data: bytes) -> int | None:
    """348 (NIfTI-1) or 540 (NIfTI-2) when the bytes start with a NIfTI header's size field (either byte order)."""
    for order in ("little", "big"):
        size = int.from_bytes(data[:4], order) if len(data) >= 4 else 0
        if size in (348, 540):
            return size
    return None


def nifti_voxels(data: bytes, ending: str) -> int | None:
    """Voxels a NIfTI header announces (read without decompressing the data), or None when unreadable."""
    import nibabel as nib

    try:
        stream = gzip.GzipFile(fileobj=io.BytesIO(data)) if ending == ".nii.gz" else io.BytesIO(data)
        first = stream.read(540)
        header_class = nib.Nifti2Header if nifti_header_size(first) == 540 else nib.Nifti1Header
        header = header_class.from_fileobj(io.BytesIO(first))
        return int(np.prod(header.get_data_shape(), dtype=np.int64))
    except Exception:
        return None


def check_self_contained(data: bytes, ending: str) -> None:
    """Refuse header formats that name another file for their data (NRRD ``data file:``, MetaImage
    ``ElementDataFile`` other than ``LOCAL``, ``.nhdr``/``.mhd``): reading them would read a file on the server.

    Raises:
        MedsegError: an upload whose pixels would come from elsewhere.
    """
    if ending in (".nhdr", ".mhd"):
        raise MedsegError(f"{ending} headers name a separate data file: upload .nrrd, .mha or .nii.gz instead")
    head = data[:65536].split(b"\n\n", 1)[0].lower()
    if ending == ".nrrd" and (b"data file:" in head or b"datafile:" in head):
        raise MedsegError("NRRD upload names a separate data file: send the data inline")
    if ending == ".mha":
        lines = [
            line.strip() for line in data[:65536].lower().splitlines() if line.strip().startswith(b"elementdatafile")
        ]
        if not lines or not lines[0].replace(b" ", b"").endswith(b"=local"):
            raise MedsegError("MetaImage upload names a separate data file: send ElementDataFile = LOCAL")


def announced_voxels(data: bytes, ending: str) -> int | None:
    """Voxels an upload's header announces, read without inflating its data (None when it cannot tell)."""
    import zipfile

    try:
        if ending in (".nii", ".nii.gz"):
            return nifti_voxels(data, ending)
        if ending == ".npy":
            stream = io.BytesIO(data)
            version = np.lib.format.read_magic(stream)
            shape = np.lib.format._read_array_header(stream, version)[0]  # type: ignore[attr-defined]
            return int(np.prod(shape, dtype=np.int64))
        if ending == ".npz":  # the largest member's uncompressed size, in bytes: at least its voxels
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                return max((info.file_size for info in archive.infolist()), default=0)
        if ending == ".nrrd":
            for line in data[:65536].split(b"\n\n", 1)[0].splitlines():
                if line.lower().startswith(b"sizes:"):
                    return int(np.prod([int(v) for v in line.split(b":", 1)[1].split()], dtype=np.int64))
        if ending in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(io.BytesIO(data)) as tiff:
                return int(np.prod(tiff.series[0].shape, dtype=np.int64))
        if ending in (".png", ".bmp"):
            from PIL import Image as PILImage

            with PILImage.open(io.BytesIO(data)) as picture:
                return picture.width * picture.height * len(picture.getbands())
    except Exception:
        return None
    return None


def parse_label_map(workspace: Workspace, image_id: str, data: bytes, ext: str | None) -> np.ndarray:
    """An uploaded file's bytes as the label map of ``image_id`` (checked: shape, geometry, task's labels).

    Raises:
        MedsegError: an unknown or unreadable format, several channels, another shape or geometry, values the
            task does not name.
    """
    if ext is not None:
        ending = ext if ext.startswith(".") else f".{ext}"
        if ending.lower() not in SUPPORTED_EXTENSIONS:
            raise MedsegError(f"unknown upload extension {ext[:20]!r} (known: {', '.join(SUPPORTED_EXTENSIONS)})")
        ending = ending.lower()
    else:
        found = sniff_extension(data)
        if found is None:
            raise MedsegError("cannot tell the upload's format: send NIfTI, PNG, NPY/NPZ, TIFF or NRRD bytes, or ?ext=")
        ending = found
    check_self_contained(data, ending)
    image = workspace.image(image_id)
    voxels, expected = announced_voxels(data, ending), int(np.prod(image.shape))
    # a header announcing a huge array is refused before it is inflated (npz: bytes, at most 8 per voxel)
    too_many = voxels is not None and (voxels > 8 * expected + 1024 if ending == ".npz" else voxels > 4 * expected)
    if too_many or (voxels is not None and ending in (".nii", ".nii.gz") and voxels != expected):
        raise MedsegError(f"upload announces {voxels} {'bytes' if ending == '.npz' else 'voxels'}; image "
                          f"{image_id!r} of shape {image.shape} has {expected} voxels")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="medseg-upload-") as folder:
        path = Path(folder) / f"upload{ending}"
        path.write_bytes(data)
        try:
            upload = load(path)
        except MedsegError as error:  # named as the upload, not the temporary file
            raise MedsegError(f"unreadable {ending} upload: {error.problem}") from None
        except Exception as error:
            raise MedsegError(f"unreadable {ending} upload ({type(error).__name__})") from None
    if upload.channels != 1:
        raise MedsegError(f"a label map has one channel; the upload has {upload.channels}")
    if ending in _GEOMETRY_FORMATS and not upload.geometry.matches(image.geometry):
        difference = upload.geometry.describe_difference(image.geometry)
        raise MedsegError(f"upload's geometry differs from image {image_id!r}'s: {difference}")
    return workspace.check_label(image_id, upload.array)
