"""The DICOM series a DICOM-SEG references, from its headers (pydicom; pixels not read).

`read_source` sorts the instances along the slice normal (row x column of ImageOrientationPatient), as GDCM does
for `medseg.io.sitk_io.read_dicom_series`, and works out the grid they make; `check_grid` holds a label map to it.
Instance numbers and file names play no part.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError
from medseg.io.image import Geometry, Image

SEGMENTATION_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation Storage",
}
# Type 1 attributes of every source instance a SEG needs to reference it and to place its frames.
REQUIRED_ATTRIBUTES = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
)
# A label map's grid and the series' grid agree within this (mm, direction cosines); slice positions must lie
# within `_POSITION_TOL_MM` of an evenly spaced stack.
_GRID_ATOL = 1e-3
_POSITION_TOL_MM = 0.01
_DICOM_SUFFIXES = ("", ".dcm", ".ima")


@dataclass(frozen=True)
class SourceSeries:
    """The source instances of a SEG: headers sorted along the slice normal, and the grid they make.

    ``datasets[k]`` (read from ``files[k]``, pixels not read) is slice ``k`` of the volume ``load`` gives;
    ``geometry`` is that volume's, 3D (for a one-slice series too), ``shape`` ``(slices, rows, columns)``.
    """

    path: Path
    files: tuple[Path, ...]
    datasets: tuple[Any, ...]
    geometry: Geometry
    shape: tuple[int, int, int]


def is_segmentation(path: str | Path) -> bool:
    """True when ``path`` is a DICOM file whose Modality is SEG or whose SOP class is a Segmentation."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "Modality"])
    except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError, TypeError):
        return False
    return str(ds.get("Modality", "")).upper() == "SEG" or str(ds.get("SOPClassUID", "")) in SEGMENTATION_SOP_CLASSES


def dicom_files(folder: Path) -> list[Path]:
    """The files of ``folder`` that may be DICOM (no extension, .dcm or .ima; no hidden files, no DICOMDIR)."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and p.suffix.lower() in _DICOM_SUFFIXES
        and p.name.upper() != "DICOMDIR"
    )


def read_source(path: str | Path) -> SourceSeries:
    """Read the headers of the DICOM series in folder ``path`` (or of one DICOM file) for a SEG to reference.

    Raises:
        MedsegError: no DICOM files, a file that is not DICOM or is a SEG, several series, a multi-frame
            instance, an instance without one of `REQUIRED_ATTRIBUTES`, instances that differ in orientation,
            pixel spacing, size, study or frame of reference, or slices not evenly spaced along their normal.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    files = dicom_files(path) if path.is_dir() else [path]
    if not files:
        raise MedsegError("folder holds no DICOM files", path)
    datasets = []
    for f in files:
        try:
            datasets.append(pydicom.dcmread(f, stop_before_pixels=True))
        except (InvalidDicomError, OSError, ValueError, EOFError) as err:
            raise MedsegError(f"not a readable DICOM file ({str(err).splitlines()[0][:120]})", f) from None
    for f, ds in zip(files, datasets, strict=True):
        if str(ds.get("Modality", "")).upper() == "SEG" or str(ds.get("SOPClassUID", "")) in SEGMENTATION_SOP_CLASSES:
            raise MedsegError("a DICOM-SEG among the source series' files (a SEG's source is an image series)", f)
        missing = [name for name in REQUIRED_ATTRIBUTES if ds.get(name) in (None, "")]
        if missing:
            raise MedsegError(f"no {', '.join(missing)}: a DICOM-SEG needs it to reference and place this slice", f)
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise MedsegError("multi-frame source images are not supported for DICOM-SEG output", f)
    series = sorted({str(ds.SeriesInstanceUID) for ds in datasets})
    if len(series) > 1:
        raise MedsegError(f"folder holds {len(series)} DICOM series; a DICOM-SEG references one", path)
    first = datasets[0]
    for name in ("StudyInstanceUID", "FrameOfReferenceUID", "Rows", "Columns"):
        odd = next((f for f, ds in zip(files, datasets, strict=True) if ds.get(name) != first.get(name)), None)
        if odd is not None:
            raise MedsegError(f"{name} differs from that of {files[0].name} (one series, one grid)", odd)
    cosines = np.asarray([float(v) for v in first.ImageOrientationPatient], dtype=float)
    spacing = np.asarray([float(v) for v in first.PixelSpacing], dtype=float)  # (row spacing dy, column dx)
    for f, ds in zip(files, datasets, strict=True):
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient], cosines, atol=_GRID_ATOL):
            raise MedsegError(f"ImageOrientationPatient differs from that of {files[0].name}", f)
        if not np.allclose([float(v) for v in ds.PixelSpacing], spacing, atol=_GRID_ATOL):
            raise MedsegError(f"PixelSpacing differs from that of {files[0].name}", f)
    normal = np.cross(cosines[:3], cosines[3:6])
    positions = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in datasets], dtype=float)
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    if len(files) > 1:
        step = float((positions[-1] - positions[0]) @ normal) / (len(files) - 1)  # as ITK's series reader
        expected = positions[0] + np.arange(len(files))[:, None] * step * normal
        worst = int(np.argmax(np.linalg.norm(positions - expected, axis=1)))
        if step <= 0 or np.linalg.norm(positions[worst] - expected[worst]) > max(_POSITION_TOL_MM, 0.01 * step):
            raise MedsegError(
                f"slices are not evenly spaced along their normal (slice {worst}, {files[order[worst]].name}; "
                "missing, duplicate or tilted slices?)",
                path,
            )
    else:
        step = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
    direction = np.stack([cosines[:3], cosines[3:6], normal], axis=1)  # columns: ITK axes x, y, z
    geometry = Geometry(
        (float(spacing[1]), float(spacing[0]), abs(step)),
        tuple(float(v) for v in positions[0]),
        tuple(float(v) for v in direction.ravel()),
    )
    return SourceSeries(
        path=path,
        files=tuple(files[i] for i in order),
        datasets=tuple(datasets[i] for i in order),
        geometry=geometry,
        shape=(len(files), int(first.Rows), int(first.Columns)),
    )


def check_grid(label: Image, source: SourceSeries, where: str | Path | None = None) -> None:
    """Raise unless ``label`` lies on ``source``'s grid: same shape, spacing, origin and direction (a 2D label
    map: a one-slice series, compared in its plane as `read_dicom_series` reads it).

    Raises:
        MedsegError: shape or geometry differ, named by ``where``.
    """
    expected = source.geometry
    shape: tuple[int, ...] = source.shape
    if label.ndim == 2:
        if source.shape[0] != 1:
            raise MedsegError(f"2D label map for a series of {source.shape[0]} slices", where)
        shape = source.shape[1:]
        d = expected.direction_matrix()
        expected = Geometry(expected.spacing[:2], expected.origin[:2], tuple(d[:2, :2].ravel().tolist()))
    if label.shape != shape:
        raise MedsegError(
            f"label map of shape {label.shape} does not fit the DICOM series {source.path} of shape {shape}", where
        )
    if not label.geometry.matches(expected, atol=_GRID_ATOL):
        raise MedsegError(
            f"label map's grid differs from the DICOM series {source.path}: "
            f"{label.geometry.describe_difference(expected)}",
            where,
        )
