"""DICOM Segmentation (DICOM-SEG) in and out, through highdicom.

Writing: a label map on the grid of a DICOM series (what ``medseg.io.load(folder)`` reads) becomes one
Segmentation instance (PS3.3 A.51, highdicom ``hd.seg.Segmentation``), BINARY, one segment per label value
``1..N``, every frame kept (empty ones too), so that the SEG covers the source's whole grid. Each label-map
slice ``k`` references the source instance whose ImagePositionPatient is the slice's position (the series
sorted along its normal, as GDCM sorts it for `medseg.io.sitk_io.read_dicom_series`); instance numbers and
file names play no part.

Reading: a SEG file becomes an integer label map (segment number -> label value) on the SEG's own grid,
derived from its frames' PlanePositionSequence, PlaneOrientationSequence and PixelMeasuresSequence
(highdicom's ``get_volume``), in the axis order ``read_dicom_series`` gives a series (slices ascending
along row x column), 2D when the SEG has one frame position (as a one-slice series reads).

pydicom and highdicom are imported inside the functions: ``import medseg.io`` stays fast.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError
from medseg.io.dicom_source import SEGMENTATION_SOP_CLASSES, SourceSeries, check_grid, read_source
from medseg.io.image import Geometry, Image, as_label_array

ALGORITHM_TYPES = ("AUTOMATIC", "SEMIAUTOMATIC", "MANUAL")
# Type 2 patient and study attributes the SEG copies: allowed empty, so an absent one is copied as empty.
_COPIED_EMPTY_IF_ABSENT = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_LO_MAX = 64  # characters of a Long String (SegmentLabel)


def segment_labels(
    values: Sequence[int], names: Mapping[int, str] | Sequence[str] | None, where: str | Path | None = None
) -> list[str]:
    """The SegmentLabel of segments ``1..N``: ``N`` the largest of ``values`` (label values present) and of the
    named values; ``names`` maps a label value to its name (dataset.json ``labels`` inverted; value 0 ignored),
    or lists the names of values 1, 2, ...; without names (None or empty), value ``v`` is ``label <v>``, and so
    is an absent value between named ones (an empty segment); no value and no name at all: one empty segment,
    ``label 1``. Names are cut to 64 characters (a DICOM Long String).

    Raises:
        MedsegError: names are given and a present value has none (more labels than names).
    """
    named: dict[int, str] = {}
    if isinstance(names, Mapping):
        named = {int(v): str(n) for v, n in names.items() if int(v) != 0}
    elif names is not None:
        named = {v: str(n) for v, n in enumerate([names] if isinstance(names, str) else names, start=1)}
    unnamed = [v for v in values if v not in named]
    if named and unnamed:
        raise MedsegError(
            f"label value {unnamed[0]} has no segment name (names given for {sorted(named) or 'no value'})", where
        )
    count = max([*values, *named, 1])
    return [named.get(v, f"label {v}").replace("\\", "/")[:_LO_MAX] for v in range(1, count + 1)]


def build_segmentation(
    label: Image,
    source: SourceSeries,
    *,
    segment_names: Mapping[int, str] | Sequence[str] | None = None,
    algorithm_type: str = "AUTOMATIC",
    algorithm_name: str = "medseg",
    series_description: str = "medseg segmentation",
    series_number: int | None = None,
) -> Any:
    """The ``hd.seg.Segmentation`` of ``label`` referencing ``source`` (in memory; see `save_dicom_seg`)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    where = label.meta.get("path")
    array = as_label_array(label)
    check_grid(label, source, where)
    if algorithm_type not in ALGORITHM_TYPES:
        raise MedsegError(f"algorithm type {algorithm_type!r} is not one of {', '.join(ALGORITHM_TYPES)}")
    values = [int(v) for v in np.unique(array) if v != 0]
    names = segment_labels(values, segment_names, where)
    if len(names) > 65535:
        raise MedsegError(f"label value {len(names)} is beyond DICOM's segment numbers (1..65535)", where)
    version = _medseg_version()
    algorithm = None
    if algorithm_type != "MANUAL":
        family = codes.cid7162.ArtificialIntelligence
        algorithm = hd.AlgorithmIdentificationSequence(name=algorithm_name[:_LO_MAX], family=family, version=version)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Organ,
            algorithm_type=algorithm_type,
            algorithm_identification=algorithm,
        )
        for number, name in enumerate(names, start=1)
    ]
    frames = array.reshape(source.shape).astype(np.uint8 if len(names) <= 255 else np.uint16)
    if series_number is None:
        number = str(source.datasets[0].get("SeriesNumber", "") or "")
        series_number = int(number) + 1000 if number.lstrip("-").isdigit() else 1000
    try:
        return hd.seg.Segmentation(
            source_images=[_with_type2(ds) for ds in source.datasets],
            pixel_array=frames,
            segmentation_type="BINARY",
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="medseg",
            manufacturer_model_name="medseg",
            software_versions=version,
            device_serial_number="0",
            series_description=series_description[:_LO_MAX],
            omit_empty_frames=False,
        )
    except (ValueError, TypeError, AttributeError) as err:
        raise MedsegError(f"cannot make a DICOM-SEG ({str(err).splitlines()[0][:160]})", where) from None


def save_dicom_seg(
    label: Image,
    path: str | Path,
    source: str | Path,
    *,
    segment_names: Mapping[int, str] | Sequence[str] | None = None,
    algorithm_type: str = "AUTOMATIC",
    algorithm_name: str = "medseg",
    series_description: str = "medseg segmentation",
    protect: Sequence[str | Path] = (),
) -> Path:
    """Write ``label`` as a DICOM Segmentation that references the series in folder ``source``, atomically.

    Args:
        label: integer label map ``(z, y, x)`` on the grid of ``medseg.io.load(source)`` (``(y, x)`` for a
            one-slice series or one DICOM file); label value ``v`` becomes segment number ``v``.
        path: the ``.dcm`` file to write (its folder is created); never inside ``source``, never an input.
        source: the DICOM series folder (or single DICOM file) the label map was made on.
        segment_names: label value -> name (e.g. dataset.json ``labels`` inverted), or the names of values
            1, 2, ...; default ``label 1``, ``label 2``... (see `segment_labels`).
        algorithm_type: AUTOMATIC (a model's prediction), SEMIAUTOMATIC (prompted) or MANUAL.
        algorithm_name: the algorithm a non-MANUAL SEG names (AlgorithmIdentificationSequence).
        series_description: SeriesDescription of the new SEG series.
        protect: more paths never to write over.

    Returns:
        ``path``. The SEG is BINARY, with the source's study and patient, a new series, category SCT
        Tissue and type SCT Organ for every segment, Manufacturer ``medseg`` and medseg's version.

    Raises:
        MedsegError: as `read_source` (source missing attributes), `check_grid` (another grid), a label map
            that is not integer, several channels, a label value without a name; ``path`` not ``.dcm``, an input
            or inside ``source``; writing fails. Nothing is written on an error.
    """
    target = Path(path)
    source = Path(source)
    protected = {Path(p).resolve() for p in (*protect, source)}
    if label.meta.get("path"):
        protected.add(Path(label.meta["path"]).resolve())
    in_source = source.is_dir() and target.resolve().is_relative_to(source.resolve())
    if target.resolve() in protected or (in_source and target.exists()):
        raise MedsegError("refusing to overwrite an input file", target)
    if in_source:
        raise MedsegError(f"refusing to write into the source series folder {source} (two series there)", target)
    if not target.name.lower().endswith(".dcm"):
        raise MedsegError("a DICOM-SEG is written to a .dcm file", target)
    if target.is_dir():
        raise MedsegError("is a folder; a DICOM-SEG is written to a .dcm file", target)
    if not source.exists():
        raise MedsegError("no such DICOM series folder or file", source)
    seg = build_segmentation(
        label,
        read_source(source),
        segment_names=segment_names,
        algorithm_type=algorithm_type,
        algorithm_name=algorithm_name,
        series_description=series_description,
    )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as err:
        raise MedsegError(f"cannot write ({err.strerror or err})", target) from None
    try:
        os.fchmod(handle, 0o644)  # mkstemp makes 0600; the SEG is read like any other output
        with os.fdopen(handle, "wb") as stream:
            seg.save_as(stream, enforce_file_format=True)
        os.replace(tmp, target)
    except (OSError, ValueError) as err:
        raise MedsegError(f"cannot write ({getattr(err, 'strerror', None) or err})", target) from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def read_dicom_seg(path: str | Path) -> Image:
    """Read a DICOM-SEG file as an integer label map (segment number -> label value) on the SEG's own grid.

    Returns:
        An `Image` ``(z, y, x)`` (``(y, x)`` for one frame position), uint8 (uint16 beyond 255 segments),
        geometry from the frames' plane positions, orientation and pixel measures; ``meta``: ``format``
        ``dicom-seg``, ``path``, ``modality``, ``series_instance_uid``, ``segment_names`` {number: label},
        ``referenced_series_instance_uid`` when the SEG names one.

    Raises:
        MedsegError: unreadable, a FRACTIONAL or surface segmentation, overlapping segments (a label map holds
            one label per voxel), frames that are not one regular stack of parallel slices, slide coordinates.
    """
    import highdicom as hd

    path = Path(path)
    try:
        seg = hd.seg.segread(path)
    except Exception as err:  # pydicom and highdicom raise many types for damaged or foreign files
        detail = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        sop = SEGMENTATION_SOP_CLASSES.get(_sop_class(path), "")
        problem = f"cannot read DICOM-SEG{'' if sop else ' (not a Segmentation instance?)'}: {detail}"
        raise MedsegError(problem, path) from None
    if str(seg.SegmentationType) == "FRACTIONAL":
        raise MedsegError("a FRACTIONAL segmentation (probabilities) is not read as a label map", path)
    try:
        volume = seg.get_volume(combine_segments=True, relabel=False)
    except (ValueError, RuntimeError, KeyError, AttributeError) as err:
        raise MedsegError(f"cannot read DICOM-SEG as a label map ({str(err).splitlines()[0][:160]})", path) from None
    if str(getattr(volume.coordinate_system, "value", volume.coordinate_system)) != "PATIENT":
        raise MedsegError("a DICOM-SEG in slide coordinates (microscopy) is not read as a volume", path)
    array, geometry = _patient_grid(np.asarray(volume.array), np.asarray(volume.affine, dtype=float))
    array = array.astype(np.uint16 if array.max(initial=0) > 255 else np.uint8)
    meta: dict[str, Any] = {
        "format": "dicom-seg",
        "path": str(path),
        "modality": str(seg.get("Modality", "SEG")),
        "series_instance_uid": str(seg.SeriesInstanceUID),
        "segment_names": {int(item.SegmentNumber): str(item.SegmentLabel) for item in seg.SegmentSequence},
    }
    referenced = seg.get("ReferencedSeriesSequence")
    if referenced:
        meta["referenced_series_instance_uid"] = str(referenced[0].SeriesInstanceUID)
    return Image(np.ascontiguousarray(array), geometry, meta=meta)


def _patient_grid(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, Geometry]:
    """``array`` ``(slices, rows, columns)`` and its geometry from highdicom's affine (index -> LPS mm), with
    slices ascending along row x column (GDCM's order); one slice -> 2D in its plane."""
    itk = affine[:3, :3][:, ::-1]  # columns: column index (x), row index (y), slice index (z)
    spacing = np.linalg.norm(itk, axis=0)
    direction = itk / spacing
    origin = affine[:3, 3].copy()
    normal = np.cross(direction[:, 0], direction[:, 1])
    if array.shape[0] > 1 and direction[:, 2] @ normal < 0:
        origin = origin + (array.shape[0] - 1) * spacing[2] * direction[:, 2]
        array = array[::-1]
    direction[:, 2] = normal
    if array.shape[0] == 1:
        in_plane = tuple(direction[:2, :2].ravel().tolist())
        return array[0], Geometry(tuple(spacing[:2].tolist()), tuple(origin[:2].tolist()), in_plane)
    return array, Geometry(tuple(spacing.tolist()), tuple(origin.tolist()), tuple(direction.ravel().tolist()))


def _with_type2(ds: Any) -> Any:
    """A copy of a source header with its absent Type 2 patient/study attributes present and empty."""
    out = copy.deepcopy(ds)
    for name in _COPIED_EMPTY_IF_ABSENT:
        if name not in out:
            setattr(out, name, "")
    return out


def _sop_class(path: Path) -> str:
    import pydicom

    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).get("SOPClassUID"))
    except Exception:
        return ""


def _medseg_version() -> str:
    """medseg's installed version (package metadata, so that io imports nothing above it)."""
    try:
        return metadata.version("medseg")
    except metadata.PackageNotFoundError:
        return "unknown"
