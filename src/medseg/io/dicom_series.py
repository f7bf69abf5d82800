"""What a DICOM folder holds, from its headers (pydicom; pixels not read), checked before GDCM reads the voxels.

`list_series` describes each series of a folder (number, description, modality, slice count) for the error a
folder of several series gets and for ``--series``; `check_series` refuses a series that would be read wrong:
a declared size over the voxel limit, a position that is not a number, a gap or a duplicate slice (naming the
files on each side), slices sheared by uneven amounts; it says whether the rescaled values need a float array
(RescaleSlope/Intercept not integers, or differing between slices) and describes a gantry tilt (`Tilt`), which
`correct_tilt` resamples onto an orthogonal grid (`check_stack` refuses tilts where no correction follows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError
from medseg.io.image import Geometry
from medseg.io.limits import check_voxels

# Slices sheared against their normal by more than this (degrees) are a tilted gantry, not rounding.
MAX_TILT_DEGREES = 0.1
# A step between neighbouring slices may differ from the typical one by this much (mm, and relative).
_SPACING_ATOL_MM = 0.01
_SPACING_RTOL = 0.01


@dataclass(frozen=True)
class SeriesSummary:
    """One series of a folder: what a user needs to pick it."""

    uid: str
    number: str
    description: str
    modality: str
    files: tuple[Path, ...]

    def describe(self, uid: bool = False) -> str:
        """``#3 'T1 AX' (MR, 24 files)``, with ``uid``: ``#3 'T1 AX' (MR, 24 files, UID 1.2.3)``."""
        number = f"#{self.number}" if self.number else "(no number)"
        extra = f", UID {self.uid}" if uid else ""
        return f"{number} '{self.description}' ({self.modality or '?'}, {len(self.files)} files{extra})"


def _header(path: Path, **kwargs: Any) -> Any:
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True, force=False, **kwargs)


def list_series(files: list[Path]) -> list[SeriesSummary]:
    """The series among ``files`` (unreadable files skipped), in order of series number."""
    from pydicom.errors import InvalidDicomError

    groups: dict[str, list[tuple[Path, Any]]] = {}
    for f in files:
        try:
            ds = _header(f, specific_tags=["SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "Modality"])
        except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError, TypeError):
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if uid:  # else damaged: reported as not readable
            groups.setdefault(uid, []).append((f, ds))
    summaries = []
    for uid, members in groups.items():
        ds = members[0][1]
        summaries.append(
            SeriesSummary(
                uid=uid,
                number=str(ds.get("SeriesNumber", "") or ""),
                description=str(ds.get("SeriesDescription", "") or ""),
                modality=str(ds.get("Modality", "") or ""),
                files=tuple(f for f, _ in members),
            )
        )

    def order(s: SeriesSummary) -> tuple[float, str]:
        try:
            return (float(s.number), s.uid)
        except ValueError:
            return (math.inf, s.uid)

    return sorted(summaries, key=order)


def choose_series(summaries: list[SeriesSummary], wanted: str | None, folder: Path) -> SeriesSummary:
    """The series ``wanted`` names (its SeriesNumber or SeriesInstanceUID), or the only one.

    Raises:
        MedsegError: several series and none chosen (they are listed), or ``wanted`` names none of them.
    """
    if not summaries:
        raise MedsegError("folder holds no readable DICOM series", folder)
    numbers = [s.number for s in summaries]
    ambiguous = len(set(numbers)) < len(numbers) or "" in numbers  # then only the UID picks one
    listing = "; ".join(s.describe(uid=ambiguous) for s in summaries)
    how = "--series UID" if ambiguous else "--series NUMBER"
    if wanted is None:
        if len(summaries) == 1:
            return summaries[0]
        raise MedsegError(
            f"folder holds {len(summaries)} DICOM series: {listing}; choose one with {how} (series are never merged)",
            folder,
        )
    matches = [s for s in summaries if wanted.strip() in (s.number, s.uid)]
    if len(matches) != 1:
        how = "no" if not matches else f"{len(matches)}"
        raise MedsegError(f"--series {wanted}: {how} series match (the folder holds: {listing})", folder)
    return matches[0]


def attribute_numbers(ds: Any, keyword: str, count: int, path: Path) -> np.ndarray:
    """A numeric multi-valued attribute, refused when it is absent, short or not numbers."""
    from pydicom.tag import Tag

    element = ds.get_item(Tag(keyword))  # unconverted where possible: pydicom raises on a DS that is no number
    if element is None or element.value in (None, "", b""):
        raise MedsegError(f"slice has no {keyword}: the slices' order and spacing are unknown", path)
    raw = element.value
    if isinstance(raw, bytes):
        raw = raw.decode("latin-1").strip(" \0").split("\\")
    values = [raw] if isinstance(raw, (str, float, int)) else list(raw)
    try:
        numbers = np.array([float(v.decode() if isinstance(v, bytes) else v) for v in values], dtype=float)
    except (TypeError, ValueError):
        shown = "\\".join(str(v) for v in values)[:60]
        raise MedsegError(f"{keyword} {shown!r} is not {count} numbers", path) from None
    if numbers.size != count or not np.all(np.isfinite(numbers)):
        raise MedsegError(f"{keyword} {numbers.tolist()} is not {count} finite numbers", path)
    return numbers


@dataclass(frozen=True)
class Tilt:
    """Slices sheared against their normal (a tilted gantry): each slice ``k`` (in position order) lies
    ``k * shift_pixels`` (rows, columns) off an orthogonal stack; ``degrees`` is the tilt angle; ``first`` the
    first slice's position; ``geometry`` the orthogonal grid `correct_tilt` resamples onto."""

    degrees: float
    shift_pixels: tuple[float, float]
    first: tuple[float, float, float]
    geometry: Geometry


def _canvas(depth: int, shift: tuple[float, float]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where the first slice's corner lands on the corrected canvas (rows, columns), and how much the canvas
    grows, for ``depth`` slices each ``shift`` pixels further."""
    total = (shift[0] * (depth - 1), shift[1] * (depth - 1))
    low = (math.floor(min(0.0, total[0])), math.floor(min(0.0, total[1])))
    return (-low[0], -low[1]), (math.ceil(abs(total[0])) + 1, math.ceil(abs(total[1])) + 1)


@dataclass(frozen=True)
class SeriesCheck:
    """What `check_series` found: whether values need floats, the rescale seen, a gantry tilt (None if none)."""

    float_values: bool
    rescale: str
    tilt: Tilt | None = None


def check_series(files: list[Path], folder: Path) -> SeriesCheck:
    """Check the headers of one series' ``files`` (in any order) before its voxels are read; the result says
    whether values need floats and describes a gantry tilt (slices sheared evenly against their normal).

    Raises:
        MedsegError: a declared size over the voxel limit; a slice without ImagePositionPatient, or one whose
            position or orientation is not numbers; two slices at one position (two echoes or a duplicate);
            a gap (the files on each side and the spacing found are named); slices sheared by uneven amounts;
            slices of different size or orientation.
    """
    headers = [_header(f) for f in files]
    first = headers[0]
    frames = sum(int(ds.get("NumberOfFrames", 1) or 1) for ds in headers)
    check_voxels((int(first.get("Columns", 0) or 0), int(first.get("Rows", 0) or 0), frames), folder)
    rescale = _rescale(headers, files)
    if len(files) < 2:
        return rescale
    size = (first.get("Rows"), first.get("Columns"))
    odd = next((f for f, ds in zip(files, headers, strict=True) if (ds.get("Rows"), ds.get("Columns")) != size), None)
    if odd is not None:  # e.g. a localizer filed with the series
        raise MedsegError(
            f"slice size differs from that of {files[0].name} ({size[0]} x {size[1]}): one series, one grid", odd
        )
    unplaced = [f for f, ds in zip(files, headers, strict=True) if "ImagePositionPatient" not in ds]
    if unplaced:
        raise MedsegError(
            f"slice file {unplaced[0].name!r} has no ImagePositionPatient (0020,0032): the slices' order and "
            f"spacing are unknown ({len(unplaced)} of {len(files)} slices lack it)",
            folder,
        )
    positions = np.stack(
        [attribute_numbers(ds, "ImagePositionPatient", 3, f) for f, ds in zip(files, headers, strict=True)]
    )
    cosines = attribute_numbers(first, "ImageOrientationPatient", 6, files[0])
    for f, ds in zip(files, headers, strict=True):
        if not np.allclose(attribute_numbers(ds, "ImageOrientationPatient", 6, f), cosines, atol=1e-3):
            raise MedsegError(f"ImageOrientationPatient differs from that of {files[0].name} (one series, one grid)", f)
    echoes = [ds.get("EchoNumbers") for ds in headers]
    order = check_stack(positions, cosines, [f.name for f in files], folder, echoes, tilt_allowed=True)
    tilt = _tilt(positions[order], cosines, attribute_numbers(first, "PixelSpacing", 2, files[0]), folder)
    return replace(rescale, tilt=tilt)


def _tilt(positions: np.ndarray, cosines: np.ndarray, pixel_spacing: np.ndarray, where: Path) -> Tilt | None:
    """The gantry tilt of slices in position order (None when they are orthogonal).

    Raises:
        MedsegError: the slices' in-plane offsets do not grow evenly from slice to slice (not one tilt).
    """
    normal = np.cross(cosines[:3], cosines[3:6])
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    degrees = math.degrees(math.acos(min(1.0, abs(float(step @ normal)) / float(np.linalg.norm(step)))))
    if degrees <= MAX_TILT_DEGREES:
        return None
    expected = positions[0] + np.arange(len(positions))[:, None] * step
    worst = float(np.max(np.linalg.norm(positions - expected, axis=1)))
    if worst > max(_SPACING_ATOL_MM, _SPACING_RTOL * abs(float(step @ normal))):
        raise MedsegError(
            f"slices are sheared against their normal by uneven amounts (up to {worst:.3g} mm off one tilt): "
            "not a gantry tilt medseg can correct",
            where,
        )
    lateral = step - (step @ normal) * normal
    # ImageOrientationPatient: the row direction (columns grow along it) first, then the column direction (rows);
    # PixelSpacing: between rows, then between columns
    dy, dx = float(pixel_spacing[0]), float(pixel_spacing[1])
    shift = (float(lateral @ cosines[3:6]) / dy, float(lateral @ cosines[:3]) / dx)
    corner, _ = _canvas(len(positions), shift)
    origin = positions[0] - corner[0] * dy * cosines[3:6] - corner[1] * dx * cosines[:3]
    direction = np.stack([cosines[:3], cosines[3:6], normal], axis=1)
    geometry = Geometry(
        (dx, dy, float(step @ normal)), tuple(float(v) for v in origin), tuple(float(v) for v in direction.ravel())
    )
    return Tilt(degrees, shift, (float(positions[0][0]), float(positions[0][1]), float(positions[0][2])), geometry)


def check_stack(
    positions: np.ndarray,
    cosines: np.ndarray,
    names: list[str],
    where: Path,
    echoes: list[Any] | None = None,
    declared_tilt: Any = None,
    tilt_allowed: bool = False,
) -> np.ndarray:
    """The order of slices (or frames) along their normal, after checking that they make one evenly spaced,
    orthogonal stack.

    Args:
        positions: ``(N, 3)`` ImagePositionPatient of each slice, mm.
        cosines: the six ImageOrientationPatient values they share.
        names: what to call each slice in messages (file names, ``frame 3``).
        where: the file or folder errors name.
        echoes: each slice's EchoNumbers (to say "two echoes" for two slices at one position).
        declared_tilt: GantryDetectorTilt, quoted in the tilt message.
        tilt_allowed: let slices sheared against their normal pass (the caller corrects the tilt).

    Raises:
        MedsegError: two slices at one position; slices sheared against their normal (gantry tilt, with the
            angle); a gap or uneven steps (the slices on each side and the spacing found are named).
    """
    normal = np.cross(cosines[:3], cosines[3:6])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    if len(names) < 2:
        return order
    ordered = [names[i] for i in order]
    steps = np.diff(along[order])
    duplicate = int(np.argmin(steps))
    if steps[duplicate] < _SPACING_ATOL_MM:
        pair = (echoes[order[duplicate]], echoes[order[duplicate + 1]]) if echoes else (None, None)
        what = f"two echoes (EchoNumbers {pair[0]} and {pair[1]})" if pair[0] != pair[1] else "two slices"
        raise MedsegError(
            f"{what} at one position ({ordered[duplicate]} and {ordered[duplicate + 1]}, "
            f"{along[order][duplicate]:.4g} mm along the normal): split them into one folder each",
            where,
        )
    shift = positions[order[-1]] - positions[order[0]]
    cos_angle = min(1.0, abs(float(shift @ normal)) / float(np.linalg.norm(shift)))
    tilt = math.degrees(math.acos(cos_angle))
    if tilt > MAX_TILT_DEGREES and not tilt_allowed:
        said = f", GantryDetectorTilt {declared_tilt}" if declared_tilt not in (None, "") else ""
        raise MedsegError(
            f"slices are sheared {tilt:.2f} degrees against their normal (gantry tilt{said}): read as a stack "
            "they would be misplaced; medseg corrects a tilt only in a series of single-frame files: convert "
            "this one with dcm2niix, which corrects it, and read its NIfTI",
            where,
        )
    if len(names) >= 3:
        typical = float(np.median(steps))
        worst = int(np.argmax(np.abs(steps - typical)))
        if abs(steps[worst] - typical) > max(_SPACING_ATOL_MM, _SPACING_RTOL * typical):
            missing = round(steps[worst] / typical) - 1
            guess = f"{missing} missing slice{'s' if missing != 1 else ''}?" if missing >= 1 else "uneven slices?"
            raise MedsegError(
                f"DICOM slices are not evenly spaced: {steps[worst]:.4g} mm between {ordered[worst]} and "
                f"{ordered[worst + 1]} where the others are {typical:.4g} mm apart ({guess})",
                where,
            )
    return order


def _rescale(headers: list[Any], files: list[Path]) -> SeriesCheck:
    """Whether the rescaled values need floats: a slope or intercept that is not an integer, or several
    (ITK sizes the array by the first slice's and would round the others' values)."""
    pairs = set()
    for f, ds in zip(files, headers, strict=True):
        try:
            pairs.add((float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)))
        except (TypeError, ValueError):
            raise MedsegError("RescaleSlope or RescaleIntercept is not a number", f) from None
    fractional = any(s != round(s) or i != round(i) for s, i in pairs)
    shown = f"{len(pairs)} different slope/intercept pairs" if len(pairs) > 1 else "one slope/intercept"
    return SeriesCheck(float_values=fractional or len(pairs) > 1, rescale=shown)


def correct_tilt(array: np.ndarray, tilt: Tilt) -> np.ndarray:
    """Resample a tilted stack (``(z, y, x)``, slices in position order) onto ``tilt.geometry``, an orthogonal
    grid, as dcm2niix does: slice ``k`` moved in plane by ``k * shift_pixels`` (linear interpolation) onto a
    canvas wide enough for every slice; outside the acquired slices, the volume's minimum. Integer values are
    rounded back to their type."""
    from scipy.ndimage import shift as shift_image

    depth, rows, columns = array.shape
    corner, grow = _canvas(depth, tilt.shift_pixels)
    fill = float(array.min())
    out = np.full((depth, rows + grow[0], columns + grow[1]), fill, dtype=np.float32)
    canvas = np.empty(out.shape[1:], dtype=np.float32)
    for k in range(depth):
        canvas.fill(fill)
        canvas[:rows, :columns] = array[k]
        offset = (k * tilt.shift_pixels[0] + corner[0], k * tilt.shift_pixels[1] + corner[1])
        out[k] = shift_image(canvas, offset, order=1, mode="constant", cval=fill)
    if array.dtype.kind in "iu":
        info = np.iinfo(array.dtype)
        return np.clip(np.round(out), info.min, info.max).astype(array.dtype)
    return out.astype(array.dtype, copy=False)
