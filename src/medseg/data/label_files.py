"""Label files as annotators save them: read with the tolerance a clear intent allows, and a notice.

- A label map of shape ``(1, H, W)`` (a one-slice volume) or ``(H, W, 1)`` for a 2D image of shape ``(H, W)``
  is read as ``(H, W)``, on the image's grid.
- A JPEG label map (lossy: grey values appear at every edge) is refused with the hint to re-export it as PNG,
  unless the dataset declares exactly two labels: then it is binarised at the midpoint of its grey range, and
  the notice says so.
- Float values within `medseg.io.image.LABEL_ROUNDING_TOLERANCE` of integers are rounded (`medseg.io.label_array`).
- A 0/255 mask where 255 is not a declared label is refused with the hint to divide by 255 (`label_value_problem`).
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import numpy as np

from medseg.errors import MedsegError, notice
from medseg.io import Image, load

LOSSY_LABEL_FORMATS = frozenset({"jpeg"})


def read_label(path: Path, image: Image | None = None, declared: Collection[int] = ()) -> Image:
    """Read the label file ``path`` for ``image`` (when given) of a dataset declaring ``declared`` label values.

    Raises:
        MedsegError: unreadable; a lossy (JPEG) label map unless exactly two labels are declared.
    """
    label = load(path)
    if label.meta.get("format") in LOSSY_LABEL_FORMATS:
        label = _binarised(label, path, sorted(set(declared)))
    if image is not None:
        label = fit_to_image(label, image, path)
    return label


def _binarised(label: Image, path: Path, declared: list[int]) -> Image:
    fmt = str(label.meta.get("format", "")).upper()
    if len(declared) != 2 or label.channels != 1:
        raise MedsegError(
            f"a {fmt} label map is lossy (compression adds grey values at every edge): re-export it as PNG "
            f"(dataset.json declaring exactly two labels lets medseg binarise it instead)",
            path,
        )
    low, high = declared
    array = label.array.astype(np.float64)
    top = float(array.max())
    # a mask saved as 0/255 (the usual export) or as the label values themselves
    midpoint = 127.5 if top > 2 * high else (low + high) / 2
    binary = np.where(array > midpoint, high, low).astype(np.uint8 if high < 256 else np.int64)
    notice(
        f"{fmt} label map (lossy) binarised at grey value {midpoint:g} into labels {low} and {high}, as "
        "dataset.json declares two labels; re-export it as PNG to keep it exact",
        path,
    )
    return label.with_array(binary, path=str(path))


def fit_to_image(label: Image, image: Image, path: Path) -> Image:
    """``label`` as 2D when it is a one-slice volume of the 2D ``image``'s shape (``(1, H, W)`` or ``(H, W, 1)``),
    on the image's grid, with a notice; else unchanged."""
    if label.ndim != 3 or image.ndim != 2 or label.channels != 1 or label.shape == image.shape:
        return label
    for axis in (0, 2):
        if label.shape[axis] == 1 and tuple(np.delete(label.shape, axis)) == image.shape:
            squeezed = np.squeeze(label.array, axis=axis)
            notice(f"label map of shape {label.shape} read as {image.shape}, the 2D image's shape", path)
            return Image(squeezed, image.geometry, meta={**label.meta, "path": str(path)})
    return label


def label_value_problem(values: Collection[int], declared: Collection[int]) -> str | None:
    """Why a label map with ``values`` does not fit the ``declared`` labels (None when it does), with the hint
    to divide by 255 for a 0/255 mask."""
    unknown = sorted(int(v) for v in values if int(v) not in set(declared))
    if not unknown:
        return None
    problem = f"label values {unknown} are not declared in dataset.json (declared: {sorted(declared)})"
    if set(int(v) for v in values) <= {0, 255} and 1 in set(declared):
        problem += "; a 0/255 mask: divide it by 255 (label 1 is 255 here)"
    return problem
