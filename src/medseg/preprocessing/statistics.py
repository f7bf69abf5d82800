"""What ``medseg info`` prints about an image's values, in bounded memory.

A file may hold up to ``MEDSEG_MAX_VOXELS`` voxels, a limit worked out at `medseg.io.limits.BYTES_PER_VOXEL_BUDGET`
(32) bytes a voxel. numpy's one-call statistics each take a copy: ``array[np.isfinite(array)]``,
``np.percentile``, ``std``'s deviations and ``np.unique`` cost together about 45 bytes a float64 voxel at the
peak. Here the moments, extremes and NaN/inf counts are gathered chunk by chunk, and one sorted copy of the
finite values, in the array's own dtype, serves the percentiles and the distinct values: the array, that copy
and a chunk's temporaries (about 17 bytes a float64 voxel, 2 a uint8 one).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

# Voxels per chunk: the temporaries of one chunk are a few MB whatever the image's size.
CHUNK_VOXELS = 1 << 18


@dataclass(frozen=True)
class ValueSummary:
    """``count`` finite values (``nan`` NaN and ``inf`` infinite ones left out of the rest); their ``minimum``,
    ``maximum``, ``mean`` and ``std`` (population, as ``np.std``); ``integral``: every finite value is an
    integer; ``ordered``: the finite values sorted, in the array's dtype (for `percentiles` and `distinct`)."""

    count: int
    nan: int
    inf: int
    minimum: float
    maximum: float
    mean: float
    std: float
    integral: bool
    ordered: np.ndarray


def chunks(array: np.ndarray) -> Iterator[np.ndarray]:
    """``array``'s values as 1D pieces of at most about `CHUNK_VOXELS` (views of a contiguous array)."""
    if array.size == 0:
        return
    if array.flags.c_contiguous:
        flat = array.reshape(-1)
        for start in range(0, flat.size, CHUNK_VOXELS):
            yield flat[start : start + CHUNK_VOXELS]
        return
    if array.ndim == 0:
        yield array.reshape(1)
        return
    step = max(1, CHUNK_VOXELS // max(1, array[0].size))
    for start in range(0, array.shape[0], step):
        yield array[start : start + step].ravel()


def summarize(array: np.ndarray) -> ValueSummary:
    """Counts, extremes and moments of ``array``'s finite values (any shape; bool is read as 0/1) in one pass
    of chunks, then their sorted copy.

    The mean and variance of the chunks are combined as Chan, Golub and LeVeque's pairwise update (float64), as
    stable as numpy's two-pass ``std``.
    """
    floating = array.dtype.kind == "f"
    count, nan, inf, mean, m2 = 0, 0, 0, 0.0, 0.0
    low, high, integral = np.inf, -np.inf, True
    for block in chunks(array):
        if floating:
            finite = np.isfinite(block)
            bad = block.size - int(np.count_nonzero(finite))
            if bad:
                nans = int(np.count_nonzero(np.isnan(block)))
                nan, inf = nan + nans, inf + bad - nans
                block = block[finite]
        if block.size == 0:
            continue
        values = block.astype(np.float64, copy=False)
        n = values.size
        block_mean = float(values.mean())
        deviations = values - block_mean
        block_m2 = float(np.dot(deviations, deviations))
        delta = block_mean - mean
        total = count + n
        mean += delta * n / total
        m2 += block_m2 + delta * delta * count * n / total
        count = total
        low, high = min(low, float(values.min())), max(high, float(values.max()))
        if floating and integral:
            integral = bool(np.all(values == np.round(values)))
    ordered = np.empty(count, dtype=array.dtype if array.dtype != np.bool_ else np.uint8)
    filled = 0
    for block in chunks(array):
        if floating:
            block = block[np.isfinite(block)]
        ordered[filled : filled + block.size] = block
        filled += block.size
    ordered.sort()
    std = float(np.sqrt(m2 / count)) if count else float("nan")
    return ValueSummary(count, nan, inf, low, high, mean if count else float("nan"), std, integral, ordered)


def percentiles(ordered: np.ndarray, qs: Sequence[float]) -> list[float]:
    """The percentiles ``qs`` (0..100) of sorted values, as ``np.percentile``'s default (``linear``) gives them,
    without its copy."""
    out = []
    last = ordered.size - 1
    for q in qs:
        virtual = last * float(q) / 100.0
        below = int(np.floor(virtual))
        above = min(below + 1, last)
        a, b, t = float(ordered[below]), float(ordered[above]), virtual - below
        out.append(a + (b - a) * t if t < 0.5 else b - (b - a) * (1.0 - t))  # numpy's _lerp
    return out


def count_distinct(ordered: np.ndarray) -> int:
    """How many distinct values sorted values hold."""
    if ordered.size == 0:
        return 0
    changes = 0
    for start in range(0, ordered.size - 1, CHUNK_VOXELS):
        piece = ordered[start : start + CHUNK_VOXELS + 1]
        changes += int(np.count_nonzero(piece[1:] != piece[:-1]))
    return changes + 1


def distinct(ordered: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of sorted values and how many times each occurs (``np.unique(..., return_counts=True)``
    without its sorted copy)."""
    if ordered.size == 0:
        return ordered[:0], np.zeros(0, np.int64)
    starts = [np.zeros(1, np.int64)]
    for start in range(0, ordered.size - 1, CHUNK_VOXELS):
        piece = ordered[start : start + CHUNK_VOXELS + 1]
        starts.append(np.flatnonzero(piece[1:] != piece[:-1]).astype(np.int64) + start + 1)
    first = np.concatenate(starts)
    counts = np.diff(np.append(first, ordered.size))
    return ordered[first], counts


def constant_value(array: np.ndarray) -> float | None:
    """The one value every voxel of ``array`` holds (NaN voxels aside: an all-zero or blank image), else None
    (also for an empty or all-NaN array). No copy: numpy's ``min`` and ``max`` (``fmin``/``fmax`` for floats)."""
    if array.size == 0:
        return None
    if array.dtype.kind == "f":
        low, high = np.fmin.reduce(array, axis=None), np.fmax.reduce(array, axis=None)
    else:
        low, high = array.min(), array.max()
    if np.isnan(low) or low != high:
        return None
    return float(low)
