"""A simulated user for interactive segmentation: click where the mask is most wrong.

The standard protocol of interactive-segmentation benchmarks (NoC@85/90; e.g. Sofiiuk et al. 2022,
"Reviving iterative training with mask guidance", and SAM's evaluation): the first click goes to the
interior-most point of the object; each next click to the interior-most point of the largest error
region, positive on a missed region, negative on a false one.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def interior_point(region: np.ndarray) -> tuple[int, int]:
    """``(x, y)`` of the pixel of a non-empty 2D mask farthest from its border."""
    distance = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), region.shape)
    return int(x), int(y)


def largest_error(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, int] | None:
    """The largest connected error region of a 2D or 3D prediction and the click label it calls for: 1 for a
    missed region (``truth & ~pred``), 0 for a false one (``pred & ~truth``); None when the prediction is perfect."""
    best: tuple[int, np.ndarray, int] | None = None
    for error, label in ((truth & ~pred, 1), (pred & ~truth, 0)):
        components, count = ndimage.label(error)
        if count == 0:
            continue
        sizes = np.bincount(components.ravel())[1:]
        k = int(np.argmax(sizes))
        if best is None or sizes[k] > best[0]:
            best = (int(sizes[k]), components == k + 1, label)
    return None if best is None else (best[1], best[2])


def next_click(pred: np.ndarray, truth: np.ndarray) -> tuple[tuple[int, int], int] | None:
    """The corrective click ``((x, y), label)`` for a 2D prediction, or None when it is already perfect.

    Label 1 (positive) inside the largest missed region, 0 (negative) inside the largest false region.
    """
    found = largest_error(pred, truth)
    return None if found is None else (interior_point(found[0]), found[1])
