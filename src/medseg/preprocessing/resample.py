"""Resample an `Image` to a target spacing with SimpleITK, and map predictions back exactly.

Grid convention (as nnU-Net's "target spacing" resampling, but done in physical space by ITK): the new
grid keeps the origin (the first voxel's centre) and the direction; along each axis
``new_size = max(1, round(old_size * old_spacing / new_spacing))`` (Python / numpy rounding, halves to
even). Points that fall just outside the old grid take the nearest voxel's value (ITK's nearest
neighbour extrapolator) rather than 0.

Interpolation: linear for images (result ``float32``), nearest neighbour for label maps (dtype kept).
Multi-channel images (trailing channel axis) are resampled as ITK vector images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from medseg.errors import MedsegError
from medseg.io.image import Geometry, Image
from medseg.io.sitk_io import from_sitk, to_sitk


@dataclass(frozen=True)
class ResampleRecord:
    """What `invert_resample` needs to return to the original grid.

    Shapes are spatial, numpy order ``(z, y, x)`` / ``(y, x)``; geometries are in ITK order (x first).
    """

    original_geometry: Geometry
    original_shape: tuple[int, ...]
    resampled_geometry: Geometry
    resampled_shape: tuple[int, ...]


def resample_to_spacing(image: Image, spacing: Sequence[float], is_label: bool = False) -> tuple[Image, ResampleRecord]:
    """Resample ``image`` onto a grid with ``spacing``, same origin and direction (see module docstring).

    Args:
        image: 2D or 3D, optionally multi-channel.
        spacing: target spacing in mm per *array* axis, numpy order ``(sz, sy, sx)`` / ``(sy, sx)``
            (the order of `Image.spacing`).
        is_label: nearest neighbour and keep the dtype (label maps) instead of linear to ``float32``.

    Returns:
        ``(resampled, record)``: the new image (meta kept) and the record for `invert_resample`.

    Raises:
        MedsegError: ``spacing`` has the wrong length or a non-positive / non-finite value.
    """
    target = _check_spacing(spacing, image.ndim)
    old = image.geometry
    itk_spacing = tuple(reversed(target))
    itk_size = [
        max(1, round(n * s_old / s_new))
        for n, s_old, s_new in zip(reversed(image.shape), old.spacing, itk_spacing, strict=True)
    ]
    new_geometry = Geometry(itk_spacing, old.origin, old.direction)
    resampled = _resample(image, new_geometry, tuple(reversed(itk_size)), is_label)
    record = ResampleRecord(
        original_geometry=old,
        original_shape=image.shape,
        resampled_geometry=new_geometry,
        resampled_shape=resampled.shape,
    )
    return resampled, record


def invert_resample(pred: Image, record: ResampleRecord, is_label: bool = True) -> Image:
    """Map a prediction made on the resampled grid back onto the original grid.

    The prediction is placed on ``record.resampled_geometry`` whatever its own geometry says (model
    outputs often carry an identity geometry); only its spatial shape is checked.

    Args:
        pred: ``(*record.resampled_shape)`` label map, or ``(*record.resampled_shape[, C])`` probabilities.
        record: from `resample_to_spacing`.
        is_label: nearest neighbour, dtype kept (labels); else linear to ``float32`` (probabilities).

    Returns:
        An `Image` of spatial shape ``record.original_shape`` whose geometry *is*
        ``record.original_geometry``; channels and meta of ``pred`` are kept.

    Raises:
        MedsegError: ``pred``'s spatial shape differs from ``record.resampled_shape``.
    """
    if pred.shape != record.resampled_shape:
        raise MedsegError(f"prediction shape {pred.shape} does not match the resampled shape {record.resampled_shape}")
    placed = Image(pred.array, record.resampled_geometry, channels=pred.channels, meta=pred.meta)
    return _resample(placed, record.original_geometry, record.original_shape, is_label)


def _resample(image: Image, geometry: Geometry, shape: tuple[int, ...], is_label: bool) -> Image:
    """Resample onto ``geometry`` with spatial ``shape`` (numpy order); the result carries ``geometry``."""
    array = image.array
    dtype = array.dtype
    if not is_label or dtype == np.float16:
        array = array.astype(np.float32, copy=False)
    src = to_sitk(Image(array, image.geometry, channels=image.channels))
    f = sitk.ResampleImageFilter()
    f.SetSize([int(n) for n in reversed(shape)])
    f.SetOutputSpacing(geometry.spacing)
    f.SetOutputOrigin(geometry.origin)
    f.SetOutputDirection(geometry.direction)
    f.SetTransform(sitk.Transform(image.ndim, sitk.sitkIdentity))
    f.SetInterpolator(sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear)
    f.SetDefaultPixelValue(0.0)
    f.SetUseNearestNeighborExtrapolator(True)
    f.SetOutputPixelType(src.GetPixelID())
    out = from_sitk(f.Execute(src), {}).array
    if is_label and out.dtype != dtype:
        out = out.astype(dtype)
    return Image(out, geometry, channels=image.channels, meta=image.meta)


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise MedsegError(f"target spacing must be {ndim} numbers, got {spacing!r}") from None
    if len(values) != ndim:
        raise MedsegError(f"target spacing {values} has {len(values)} values for a {ndim}D image")
    if not all(np.isfinite(s) and s > 0 for s in values):
        raise MedsegError(f"target spacing must be positive, got {values}")
    return values
