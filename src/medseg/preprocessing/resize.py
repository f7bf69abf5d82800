"""Resize 2D images to a square model input and back (the SAM / MedSAM / LiteMedSAM convention).

Forward (`resize_and_pad`): scale so the *longest* side equals ``target`` keeping the aspect ratio
(``new = int(old * target / longest + 0.5)``, as SAM's ``ResizeLongestSide``), then pad with zeros at the
bottom and right to ``target x target``. Inverse (`undo_resize_and_pad`): crop that padding and resize to
the exact original ``(y, x)`` shape.

Interpolation uses ``torch.nn.functional.interpolate`` on pixel centres (``align_corners=False``):
bilinear with antialiasing for images and probabilities (``float32``), ``"nearest-exact"`` for label
maps (dtype kept; a mask scaled by an integer factor comes back exactly). torch is imported on first use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medseg.errors import MedsegError


@dataclass(frozen=True)
class ResizeRecord:
    """Spatial ``(y, x)`` shapes before resizing and after resizing (before padding)."""

    original_shape: tuple[int, int]
    resized_shape: tuple[int, int]


def resize_and_pad(array: np.ndarray, target: int = 256, is_label: bool = False) -> tuple[np.ndarray, ResizeRecord]:
    """Resize the longest side to ``target`` and zero-pad bottom/right to a square.

    Args:
        array: ``(y, x)`` or channels-last ``(y, x, C)`` (a 3-D array is always read as channels-last);
            label maps must be ``(y, x)``.
        target: side of the square output in pixels, >= 1.
        is_label: nearest neighbour, dtype kept; else bilinear with antialias to ``float32``.

    Returns:
        ``(padded, record)``: ``padded`` is ``(target, target)`` or ``(target, target, C)`` with the
        resized image in ``[:ry, :rx]`` (``record.resized_shape == (ry, rx)``) and zeros elsewhere.

    Raises:
        MedsegError: not 2-D/3-D, an empty array, a multi-channel label map, or ``target < 1``.
    """
    a = np.asarray(array)
    if a.ndim not in (2, 3) or a.size == 0:
        raise MedsegError(f"expected a non-empty (y, x) or (y, x, C) array, got shape {a.shape}")
    if is_label and a.ndim != 2:
        raise MedsegError(f"a label map must be (y, x), got shape {a.shape}")
    if target < 1:
        raise MedsegError(f"target size must be >= 1, got {target}")
    h, w = int(a.shape[0]), int(a.shape[1])
    scale = target / max(h, w)
    ry = target if h >= w else max(1, int(h * scale + 0.5))
    rx = target if w >= h else max(1, int(w * scale + 0.5))
    chw = a[None] if a.ndim == 2 else np.moveaxis(a, -1, 0)
    resized = _interpolate(chw, (ry, rx), is_label)
    resized = np.moveaxis(resized, 0, -1) if a.ndim == 3 else resized[0]
    out = np.zeros((target, target, *a.shape[2:]), dtype=resized.dtype)
    out[:ry, :rx] = resized
    return out, ResizeRecord((h, w), (ry, rx))


def undo_resize_and_pad(pred: np.ndarray, record: ResizeRecord, is_label: bool = False) -> np.ndarray:
    """Crop the padding of a model output and resize it to ``record.original_shape``.

    Args:
        pred: label map ``(Y, X)``, or probabilities / logits ``(Y, X)`` or channels-first ``(K, Y, X)``
            (a leading class axis), with ``Y, X`` at least ``record.resized_shape`` (usually the square
            ``target x target``).
        record: from `resize_and_pad`.
        is_label: ``pred`` is a label map: nearest neighbour, dtype kept; else bilinear to ``float32``.

    Returns:
        ``(y, x)`` or ``(K, y, x)`` with ``(y, x) == record.original_shape``.

    Raises:
        MedsegError: wrong number of axes, or a spatial shape smaller than ``record.resized_shape``.
    """
    p = np.asarray(pred)
    allowed = (2,) if is_label else (2, 3)
    if p.ndim not in allowed:
        layout = "(Y, X)" if is_label else "(Y, X) or (K, Y, X)"
        raise MedsegError(f"expected a prediction of shape {layout}, got {p.shape}")
    ry, rx = record.resized_shape
    if p.shape[-2] < ry or p.shape[-1] < rx:
        raise MedsegError(f"prediction shape {p.shape} is smaller than the resized shape {(ry, rx)}")
    cropped = p[..., :ry, :rx]
    chw = cropped[None] if p.ndim == 2 else cropped
    out = _interpolate(chw, record.original_shape, is_label)
    return out[0] if p.ndim == 2 else out


def _interpolate(chw: np.ndarray, size: tuple[int, int], is_label: bool) -> np.ndarray:
    """Resize a ``(C, y, x)`` array to ``(C, *size)``: nearest-exact keeping dtype, or bilinear float32."""
    import torch
    import torch.nn.functional as F

    if is_label:
        # float64 holds every int32 label exactly; nearest copies values, so the cast back is lossless.
        t = torch.from_numpy(np.ascontiguousarray(chw, dtype=np.float64))[None]
        nearest = F.interpolate(t, size=size, mode="nearest-exact")[0].numpy()
        return nearest.astype(chw.dtype)
    t = torch.from_numpy(np.ascontiguousarray(chw, dtype=np.float32))[None]
    if tuple(t.shape[-2:]) == tuple(size):
        return t[0].numpy().copy()
    resized = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
    return resized[0].numpy()


def area_weights(size_in: int, size_out: int) -> np.ndarray:
    """``(size_out, size_in)`` float64 weights of OpenCV's ``INTER_AREA`` along one axis (rows sum to 1).

    What LiteMedSAM's inference script resizes with (``cv2.resize(..., interpolation=cv2.INTER_AREA)``), so
    medseg can feed the model the same pixels without OpenCV. Shrinking: each output pixel averages the input
    pixels it covers, weighted by the covered fraction (OpenCV's ``resizeArea``). Enlarging: OpenCV's
    area-aware linear taps, ``fx = (d + 1) - (s + 1) / scale`` kept only when positive, so an output pixel
    copies its input pixel except where it straddles two (OpenCV's ``resize`` with ``INTER_AREA``). A resize
    of an image is ``W_y @ image @ W_x.T``. (Both axes must shrink for OpenCV's area path; with one axis
    enlarged OpenCV takes the linear taps for both, as `area_resize` does.)

    Raises:
        MedsegError: a size below 1.
    """
    return _area_weights(size_in, size_out, shrink=size_out <= size_in)


def area_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(y, x)`` or ``(y, x, C)`` resized to ``size = (y, x)`` as ``cv2.resize(..., INTER_AREA)`` does, float64.

    A ``uint8`` image comes back with OpenCV's 8-bit rounding (integer values; its fixed-point taps when
    enlarging), so LiteMedSAM sees the pixels its reference pipeline gives it; other dtypes are resized in
    floating point (`area_weights`).

    Raises:
        MedsegError: not 2D/3D or a size below 1.
    """
    a = np.asarray(image)
    if a.ndim not in (2, 3):
        raise MedsegError(f"expected a (y, x) or (y, x, C) image, got shape {a.shape}")
    if tuple(size) == a.shape[:2] and min(size) >= 1:
        return a.astype(np.float64)  # OpenCV copies an image resized to its own size
    shrink = size[0] <= a.shape[0] and size[1] <= a.shape[1]
    rows = _area_weights(a.shape[0], size[0], shrink)
    cols = _area_weights(a.shape[1], size[1], shrink)
    if a.dtype != np.uint8:
        return _separable(rows, a.astype(np.float64), cols)
    if shrink:
        exact = _separable(rows, a.astype(np.float64), cols)
        integer_factor = a.shape[0] % size[0] == 0 and a.shape[1] % size[1] == 0
        return np.floor(exact + 0.5) if integer_factor else np.rint(exact)  # OpenCV's fast path rounds half up
    # OpenCV's 8-bit linear taps: 11-bit coefficients, a row pass in integers, then each column tap of the
    # row sums >> 4, times its coefficient >> 16, summed, rounded by (+2) >> 2.
    coef_rows = np.rint(rows * 2048).astype(np.int64)
    coef_cols = np.rint(cols * 2048).astype(np.int64)
    passed = np.moveaxis(np.tensordot(coef_cols, a.astype(np.int64), axes=([1], [1])), 0, 1) >> 4
    out = np.empty((size[0], size[1], *a.shape[2:]), np.int64)
    for y in range(size[0]):
        taps = np.flatnonzero(coef_rows[y])
        out[y] = (sum(((passed[i] * coef_rows[y, i]) >> 16) for i in taps) + 2) >> 2
    return out.astype(np.float64)


def _separable(rows: np.ndarray, image: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``rows @ image @ cols.T`` on each channel of a ``(y, x)`` or ``(y, x, C)`` array."""
    by_rows = np.tensordot(rows, image, axes=([1], [0]))  # (Y, x, ...)
    return np.moveaxis(np.tensordot(cols, by_rows, axes=([1], [1])), 0, 1)  # (Y, X, ...)


def _area_weights(size_in: int, size_out: int, shrink: bool) -> np.ndarray:
    if size_in < 1 or size_out < 1:
        raise MedsegError(f"sizes must be >= 1, got {size_in} -> {size_out}")
    weights = np.zeros((size_out, size_in))
    scale = size_in / size_out  # input pixels per output pixel
    if shrink:
        for d in range(size_out):
            start, end = d * scale, min((d + 1) * scale, size_in)
            for s in range(int(np.floor(start)), int(np.ceil(end))):
                weights[d, s] = (min(end, s + 1) - max(start, s)) / (end - start)
        return weights
    for d in range(size_out):
        s = int(np.floor(d * scale))
        fx = (d + 1) - (s + 1) / scale
        fx = 0.0 if fx <= 0 else fx - np.floor(fx)
        weights[d, min(s, size_in - 1)] += 1.0 - fx
        weights[d, min(s + 1, size_in - 1)] += fx
    return weights
