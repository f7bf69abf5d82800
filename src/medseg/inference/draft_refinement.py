"""An in-context label map refined by the promptable decoder: each object becomes a box prompt.

The in-context engines place objects well but draw their borders coarsely (features on a 1/2 or 1/4 grid);
a SAM-family decoder draws borders well from a box. Each connected component of each label (those holding at
least `MIN_FRACTION` of the label's largest) gives its bounding box; the decoder's masks, clipped to their
boxes, make the refined label map (a pixel claimed by several objects goes to the most probable).
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np
from scipy import ndimage

from medseg.inference.engines import PromptEngine
from medseg.inference.prompt_session import Prompts
from medseg.io import Image
from medseg.preprocessing.statistics import constant_value

MIN_FRACTION = 0.05  # smaller components than this share of the label's largest are dropped as specks
MAX_OBJECTS = 32  # more objects than this (nuclei, vessel pieces): the label map is returned as it was


def refine_with_decoder(
    engine: PromptEngine, image: Image, labels: np.ndarray, key: Hashable | None = None
) -> np.ndarray:
    """``labels`` ``(H, W)`` on the 2D ``image``'s grid, each object redrawn by the decoder from its box.

    Returns ``labels`` unchanged (a copy) when it is empty, 3D, or holds more than `MAX_OBJECTS` objects, or
    when the image is constant.
    ``key`` names the image for the engine's embedding cache.
    """
    if labels.ndim != 2 or not labels.any() or constant_value(image.array) is not None:
        return labels.copy()  # a blank image: no borders for the decoder to draw (and the engine refuses it)
    boxes: list[tuple[float, float, float, float]] = []
    values: list[int] = []
    for value in np.unique(labels[labels > 0]).tolist():
        components = ndimage.label(labels == value)[0]
        sizes = np.bincount(components.ravel())[1:]
        for index, where in enumerate(ndimage.find_objects(components), start=1):
            if where is None or sizes[index - 1] < MIN_FRACTION * sizes.max():
                continue
            rows, cols = where
            boxes.append((float(cols.start), float(rows.start), float(cols.stop), float(rows.stop)))
            values.append(int(value))
    if not boxes or len(boxes) > MAX_OBJECTS:
        return labels.copy()
    result = engine.predict(image, Prompts(boxes=boxes), key=key, probabilities=True)
    assert result.probabilities is not None
    best = result.probabilities.argmax(axis=0)
    refined = np.asarray(values, dtype=labels.dtype)[best]
    refined[result.probabilities.max(axis=0) <= 0.5] = 0
    return refined
