"""An in-context label map refined by the promptable decoder: each object becomes a box prompt.

The in-context engines place objects well but draw their borders coarsely (features on a 1/2 or 1/4 grid);
a SAM-family decoder draws borders well from a box. Each connected component of each label (those holding at
least `MIN_FRACTION` of the label's largest) gives its bounding box; the decoder's masks, clipped to their
boxes, make the refined label map (a pixel claimed by several objects goes to the most probable).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from medseg.errors import MedsegError
from medseg.inference.engines import InContextEngine, PromptEngine, Segmentation
from medseg.inference.incontext_predictor import content_digest
from medseg.inference.prompt_session import Prompts
from medseg.io import Image
from medseg.io.image import as_label_array
from medseg.metrics.surface import dice
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


DECODER_MODES = ("auto", "on", "off")
DEFAULT_DECODER_MODE = "auto"
DECODER_CHECKS = 3  # held-out supports (the last ones) that decide between raw and decoder-refined masks


class DecoderRefinedEngine:
    """An `InContextEngine` whose 2D label maps are redrawn by a promptable engine's decoder
    (`refine_with_decoder`): the in-context engine says where the objects are, the decoder draws them.

    ``mode``: ``"on"`` refines every 2D query; ``"off"`` never; ``"auto"`` refines where that predicts the
    support set better: the last `DECODER_CHECKS` supports, each segmented from the others (the query's options)
    and scored by mean Dice over the labels with and without refinement, decided once per support set (a single
    support cannot be held out: refined, the decoder's prior). 3D queries are never refined. Same interface as
    `InContextEngine` (``set_support``, ``predict``, ``support_size``, ``name``).

    Raises:
        MedsegError: an unknown mode.
    """

    def __init__(self, incontext: InContextEngine, decoder: PromptEngine, mode: str = "auto") -> None:
        if mode not in DECODER_MODES:
            raise MedsegError(f"unknown decoder mode {mode!r} (known: {', '.join(DECODER_MODES)})")
        self.incontext, self.decoder, self.mode = incontext, decoder, mode
        self._choice: dict[str, bool] = {}  # per query options: whether refining helps this support set
        self._support: tuple[list[Image], list[Image | np.ndarray]] | None = None

    @property
    def name(self) -> str:
        return self.incontext.name

    @property
    def support_size(self) -> int:
        return self.incontext.support_size

    def set_support(self, images: Sequence[Image], labels: Sequence[Image | np.ndarray]) -> None:
        """As `InContextEngine.set_support`; the decision is made again for the new set."""
        self.incontext.set_support(images, labels)
        self._support, self._choice = (list(images), list(labels)), {}

    def refines(self, **options: Any) -> bool:
        """Whether 2D queries predicted with ``options`` are refined (``auto``: decided on held-out supports)."""
        if self.mode != "auto":
            return self.mode == "on"
        if self._support is None:
            raise MedsegError("set a support set first (set_support)")
        images = self._support[0]
        options = {name: value for name, value in options.items() if name != "on_slice"}  # progress: not an option
        key = repr(sorted(options.items()))
        if key not in self._choice:
            self._choice[key] = len(images) < 2 or images[0].ndim != 2 or self._refining_helps(options)
        return self._choice[key]

    def predict(self, image: Image, *, probabilities: bool = False, **options: Any) -> Segmentation:
        """As `InContextEngine.predict`; a refined result is named ``<engine>+decoder`` and its probabilities
        are the in-context engine's (the decoder's masks are binary per object)."""
        result = self.incontext.predict(image, probabilities=probabilities, **options)
        if image.ndim != 2 or not self.refines(**options):
            return result
        labels = refine_with_decoder(self.decoder, image, result.labels.array, key=decoder_key(image))
        return Segmentation(image.with_array(labels), result.label_values, f"{self.name}+decoder", result.probabilities)

    def _refining_helps(self, options: dict[str, Any]) -> bool:
        assert self._support is not None
        images, labels = self._support
        arrays = [as_label_array(label) if isinstance(label, Image) else np.asarray(label) for label in labels]
        values = sorted({int(v) for array in arrays for v in np.unique(array) if v != 0})
        raw, refined = [], []
        try:
            for held in range(max(0, len(images) - DECODER_CHECKS), len(images)):
                others = [i for i in range(len(images)) if i != held]
                self.incontext.set_support([images[i] for i in others], [labels[i] for i in others])
                try:
                    predicted = self.incontext.predict(images[held], **options).labels.array
                except MedsegError:
                    continue  # the others show no foreground: this support decides nothing
                redrawn = refine_with_decoder(self.decoder, images[held], predicted, key=decoder_key(images[held]))
                raw.append(_mean_dice(predicted, arrays[held], values))
                refined.append(_mean_dice(redrawn, arrays[held], values))
        finally:
            self.incontext.set_support(images, labels)
        return bool(raw) and float(np.mean(refined)) > float(np.mean(raw))


def _mean_dice(predicted: np.ndarray, truth: np.ndarray, values: list[int]) -> float:
    return float(np.mean([dice(predicted == v, truth == v) for v in values]))


def decoder_key(image: Image) -> bytes:
    """The decoder's embedding-cache key of an image: its pixels (a query seen again reuses its embedding)."""
    return content_digest([image.array], "decoder")
