"""Enhanced (multi-frame) DICOM images: one file, its frames placed by their per-frame functional groups.

GDCM reads such a file as frames in file order with the first frame's position and a z spacing of 1 mm when
the frames are not already in order (Slicer#6773, horos#543); here each frame's ImagePositionPatient (Plane
Position Sequence) places it, the frames are sorted along their normal and held to one evenly spaced stack
(`medseg.io.dicom_series.check_stack`), and each frame's own RescaleSlope/Intercept (Pixel Value
Transformation Sequence) is applied. Pixels are decoded by pydicom.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError
from medseg.io.dicom_series import attribute_numbers, check_stack
from medseg.io.image import Geometry, Image
from medseg.io.limits import check_voxels


def is_enhanced_multiframe(path: Path) -> bool:
    """True for a DICOM file of several frames described by a Per-frame Functional Groups Sequence."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(
            path, stop_before_pixels=True, specific_tags=["NumberOfFrames", "PerFrameFunctionalGroupsSequence"]
        )
    except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError, TypeError):
        return False
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return False
    return frames > 1 and "PerFrameFunctionalGroupsSequence" in ds


def _group(ds: Any, index: int, sequence: str) -> Any:
    """Frame ``index``'s item of functional group ``sequence``: per-frame, else shared, else None."""
    for groups in (ds.PerFrameFunctionalGroupsSequence[index], _shared(ds)):
        if groups is not None and sequence in groups and len(groups[sequence].value):
            return groups[sequence].value[0]
    return None


def _shared(ds: Any) -> Any:
    shared = ds.get("SharedFunctionalGroupsSequence")
    return shared[0] if shared else None


def read_multiframe(path: Path) -> Image:
    """Read an enhanced multi-frame DICOM image as a 3D volume in physical order.

    Raises:
        MedsegError: a declared size over the voxel limit; a frame without a position, orientation or pixel
            spacing; frames of different orientation; frames that are not one evenly spaced, orthogonal stack
            (several stacks, time points or echoes in one file, a gap, a tilt); pixels pydicom cannot decode.
    """
    import pydicom

    header = pydicom.dcmread(path, stop_before_pixels=True)
    frames, rows, columns = int(header.NumberOfFrames), int(header.Rows), int(header.Columns)
    check_voxels((columns, rows, frames, int(header.get("SamplesPerPixel", 1) or 1)), path)
    if len(header.PerFrameFunctionalGroupsSequence) != frames:
        raise MedsegError(
            f"{len(header.PerFrameFunctionalGroupsSequence)} per-frame functional groups for {frames} frames", path
        )
    positions, orientations, spacings, rescale = [], [], [], []
    for k in range(frames):
        where = f"frame {k + 1}"
        plane = _group(header, k, "PlanePositionSequence")
        orientation = _group(header, k, "PlaneOrientationSequence")
        measures = _group(header, k, "PixelMeasuresSequence")
        for group, name in (
            (plane, "Plane Position"),
            (orientation, "Plane Orientation"),
            (measures, "Pixel Measures"),
        ):
            if group is None:
                raise MedsegError(f"{where} has no {name} Sequence: its place in the volume is unknown", path)
        positions.append(attribute_numbers(plane, "ImagePositionPatient", 3, path))
        orientations.append(attribute_numbers(orientation, "ImageOrientationPatient", 6, path))
        spacings.append(attribute_numbers(measures, "PixelSpacing", 2, path))
        if not np.allclose(orientations[-1], orientations[0], atol=1e-3) or not np.allclose(
            spacings[-1], spacings[0], atol=1e-4
        ):
            raise MedsegError(f"{where}'s orientation or pixel spacing differs from frame 1's (one grid)", path)
        transform = _group(header, k, "PixelValueTransformationSequence")
        source = transform if transform is not None else header
        rescale.append((float(source.get("RescaleSlope", 1) or 1), float(source.get("RescaleIntercept", 0) or 0)))
    cosines, spacing = orientations[0], spacings[0]
    stack = np.stack(positions)
    names = [f"frame {k + 1}" for k in range(frames)]
    order = check_stack(stack, cosines, names, path, declared_tilt=header.get("GantryDetectorTilt"))
    try:
        stored = pydicom.dcmread(path).pixel_array
    except Exception as err:  # pydicom raises many types for compressed data it has no decoder for
        raise MedsegError(
            f"cannot decode the multi-frame pixel data ({str(err).splitlines()[0][:120]})", path
        ) from None
    if stored.shape[:3] != (frames, rows, columns) or stored.ndim != 3:
        raise MedsegError(f"pixel data of shape {stored.shape} for {frames} frames of {rows} x {columns}", path)
    slopes = np.array([s for s, _ in rescale])[:, None, None]
    intercepts = np.array([i for _, i in rescale])[:, None, None]
    integral = len(set(rescale)) == 1 and all(v == round(v) for v in rescale[0])
    values = stored.astype(np.float64) * slopes + intercepts
    if integral:
        low, high = values.min(), values.max()
        dtype = np.int16 if low >= -(2**15) and high < 2**15 else np.int32
        array = values.astype(dtype)[order]
    else:
        array = values.astype(np.float32)[order]
    normal = np.cross(cosines[:3], cosines[3:6])
    step = float((stack[order[-1]] - stack[order[0]]) @ normal) / (frames - 1)
    direction = np.stack([cosines[:3], cosines[3:6], normal], axis=1)
    geometry = Geometry(
        (float(spacing[1]), float(spacing[0]), step),
        tuple(float(v) for v in stack[order[0]]),
        tuple(float(v) for v in direction.ravel()),
    )
    meta: dict[str, Any] = {"format": "dicom", "path": str(path), "dicom_source": str(path), "frames_placed": frames}
    for keyword, name in (("Modality", "modality"), ("SeriesDescription", "series_description")):
        if header.get(keyword):
            meta[name] = str(header.get(keyword))
    if len(set(rescale)) > 1:
        meta["rescale"] = f"{len(set(rescale))} different slope/intercept pairs"
    return Image(np.ascontiguousarray(array), geometry, meta=meta)
