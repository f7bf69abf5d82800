"""File formats by extension, and the format a label map for an input is written in."""

from __future__ import annotations

import re
from pathlib import Path

from medseg.errors import MedsegError

# Extension (lower case, longest first) -> format name.
_EXTENSIONS: dict[str, str] = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".mha": "metaimage",
    ".mhd": "metaimage",
    ".dcm": "dicom",
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".bmp": "bmp",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".gif": "gif",
    ".npy": "npy",
    ".npz": "npz",
    ".mrc": "mrc",
}
SITK_FORMATS = frozenset({"nifti", "nrrd", "metaimage", "dicom"})
RASTER_FORMATS = frozenset({"png", "jpeg", "bmp", "tiff", "gif"})
# Formats a label map can be written in without loss.
LOSSLESS_LABEL_FORMATS = frozenset({"nifti", "nrrd", "metaimage", "png", "bmp", "tiff", "npy", "npz"})
SUPPORTED_EXTENSIONS = tuple(_EXTENSIONS)


def split_extension(path: str | Path) -> tuple[str, str]:
    """``("case_0000", ".nii.gz")`` for ``.../case_0000.nii.gz``; the extension keeps its case."""
    name = Path(path).name
    for ext in _EXTENSIONS:
        if name.lower().endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], name[-len(ext) :]
    suffix = Path(name).suffix
    return (name[: -len(suffix)] if suffix else name), suffix


def format_of(path: str | Path) -> str:
    """The format name of a file, or ``"dicom"`` for a folder (a DICOM series).

    Raises:
        MedsegError: unknown extension.
    """
    p = Path(path)
    if p.is_dir():
        return "dicom"
    ext = split_extension(p)[1].lower()
    if ext not in _EXTENSIONS:
        known = ", ".join(SUPPORTED_EXTENSIONS)
        raise MedsegError(f"unknown file extension '{ext or '(none)'}' (supported: {known}, DICOM folder)", p)
    return _EXTENSIONS[ext]


def is_image_file(path: Path) -> bool:
    """True for a file whose extension medseg reads (hidden and temporary files excluded)."""
    if path.name.startswith("."):
        return False
    return split_extension(path)[1].lower() in _EXTENSIONS


def label_path_for(input_path: str | Path, out_dir: str | Path, case: str | None = None) -> Path:
    """Where a label map for ``input_path`` goes in ``out_dir``: same format when lossless.

    JPEG/GIF inputs get PNG, DICOM and MRC inputs get NIfTI (``.nii.gz``).
    """
    stem, ext = split_extension(input_path)
    fmt = format_of(input_path)
    if fmt == "dicom":
        ext, stem = ".nii.gz", Path(input_path).name if Path(input_path).is_dir() else stem
    elif fmt in ("jpeg", "gif"):
        ext = ".png"
    elif fmt == "mrc":
        ext = ".nii.gz"
    return Path(out_dir) / f"{case or stem}{ext}"


_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def split_channel(stem: str) -> tuple[str, int] | None:
    """``("case", 1)`` for nnU-Net's ``case_0001`` (case name, channel index); None without the suffix."""
    match = _CHANNEL_SUFFIX.match(stem)
    return None if match is None else (match["case"], int(match["channel"]))


def case_of(path: str | Path) -> str:
    """The case a file names: its stem without the nnU-Net channel suffix (``case_0000.nii.gz`` -> ``case``)."""
    stem = split_extension(path)[0]
    return stem[:-5] if stem.endswith("_0000") else stem
