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
    image = workspace.image(image_id)
    if ending in (".nii", ".nii.gz"):  # a header announcing a huge array is refused before it is inflated
        voxels = nifti_voxels(data, ending)
        if voxels is not None and voxels != int(np.prod(image.shape)):
            raise MedsegError(f"upload holds {voxels} voxels; image {image_id!r} of shape {image.shape} has "
                              f"{int(np.prod(image.shape))}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="medseg-upload-") as folder:
        path = Path(folder) / f"upload{ending}"
        path.write_bytes(data)
        try:
            upload = load(path)
        except MedsegError:
            raise
        except Exception as error:
            raise MedsegError(f"unreadable {ending} upload ({type(error).__name__})") from None
    if upload.channels != 1:
        raise MedsegError(f"a label map has one channel; the upload has {upload.channels}")
    if ending in _GEOMETRY_FORMATS and not upload.geometry.matches(image.geometry):
        difference = upload.geometry.describe_difference(image.geometry)
        raise MedsegError(f"upload's geometry differs from image {image_id!r}'s: {difference}")
    return workspace.check_label(image_id, upload.array)
