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
# Formats written without spacing, origin or direction (read back as the identity).
NO_GEOMETRY_FORMATS = RASTER_FORMATS | {"npy"}
SUPPORTED_EXTENSIONS = tuple(_EXTENSIONS)
# What a command writes for each input (``--output-format``): ``auto`` the input's format when it holds a label
# map losslessly (NIfTI for DICOM and MRC, PNG for JPEG/GIF), ``nifti`` always ``.nii.gz``, ``dicom-seg`` a
# DICOM Segmentation (``.dcm``) referencing a DICOM input.
OUTPUT_FORMATS = ("auto", "nifti", "dicom-seg")


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


def label_path_for(
    input_path: str | Path, out_dir: str | Path, case: str | None = None, output_format: str = "auto"
) -> Path:
    """Where a label map for ``input_path`` goes in ``out_dir``, by ``output_format`` (`OUTPUT_FORMATS`).

    ``auto``: same format when lossless; JPEG/GIF inputs get PNG, DICOM and MRC inputs get NIfTI (``.nii.gz``).
    ``nifti``: ``.nii.gz`` for every input. ``dicom-seg``: ``.dcm`` (a DICOM-SEG), for DICOM inputs only.

    Raises:
        MedsegError: an unknown ``output_format``, or ``dicom-seg`` for an input that is not DICOM.
    """
    check_output_format(output_format)
    stem, ext = split_extension(input_path)
    fmt = format_of(input_path)
    if fmt == "dicom" and Path(input_path).is_dir():
        stem = Path(input_path).name
    if output_format == "dicom-seg":
        if fmt != "dicom":
            raise MedsegError(_NOT_DICOM, input_path)
        ext = ".dcm"
    elif output_format == "nifti" or fmt in ("dicom", "mrc"):
        ext = ".nii.gz"
    elif fmt in ("jpeg", "gif"):
        ext = ".png"
    return Path(out_dir) / f"{case or stem}{ext}"


_NOT_DICOM = "DICOM-SEG output needs a DICOM input (a series folder or a .dcm file); this input is not DICOM"


def check_output_format(
    output_format: str, target: str | Path | None = None, input_path: str | Path | None = None
) -> None:
    """Raise unless ``output_format`` is one of `OUTPUT_FORMATS` and agrees with a ``target`` file named by the
    user (``dicom-seg``: ``.dcm``; ``nifti``: ``.nii``/``.nii.gz``), and unless a DICOM-SEG target (``.dcm``,
    whatever the format) has a DICOM ``input_path``.

    Raises:
        MedsegError: as above, naming the target or the input.
    """
    if output_format not in OUTPUT_FORMATS:
        raise MedsegError(f"unknown output format {output_format!r} (known: {', '.join(OUTPUT_FORMATS)})")
    if target is None:
        return
    fmt = format_of(target)
    if output_format == "dicom-seg" and fmt != "dicom":
        raise MedsegError("output format dicom-seg writes a .dcm file; name the output .dcm, or a folder", target)
    if output_format == "nifti" and fmt != "nifti":
        raise MedsegError("output format nifti writes .nii.gz; name the output .nii.gz, or a folder", target)
    if fmt == "dicom" and input_path is not None and format_of(input_path) != "dicom":
        raise MedsegError(_NOT_DICOM, input_path)


MRC_NOT_WRITTEN = "writing MRC is not supported; write .nii.gz"


def check_label_target(target: str | Path, ndim: int) -> None:
    """Raise what `medseg.io.save` would for a label map with ``ndim`` spatial dimensions written to
    ``target``, before the work that makes it: MRC (not written), a 3D map as a 2D raster, a lossy format.

    Raises:
        MedsegError: as above, naming the target.
    """
    fmt = format_of(target)
    if fmt == "mrc":
        raise MedsegError(MRC_NOT_WRITTEN, target)
    if ndim != 2 and fmt in RASTER_FORMATS and fmt != "tiff":  # first: .png is no way out for a volume
        raise MedsegError(f"cannot write a {ndim}D image as {fmt.upper()} (use .nii.gz)", target)
    if fmt != "dicom" and fmt not in LOSSLESS_LABEL_FORMATS:
        raise MedsegError(f"{fmt.upper()} is lossy and would corrupt a label map; use .png or .nii.gz", target)


_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def split_channel(stem: str) -> tuple[str, int] | None:
    """``("case", 1)`` for nnU-Net's ``case_0001`` (case name, channel index); None without the suffix."""
    match = _CHANNEL_SUFFIX.match(stem)
    return None if match is None else (match["case"], int(match["channel"]))


def case_of(path: str | Path) -> str:
    """The case a file names: its stem without the nnU-Net channel suffix (``case_0000.nii.gz`` -> ``case``)."""
    stem = split_extension(path)[0]
    return stem[:-5] if stem.endswith("_0000") else stem
