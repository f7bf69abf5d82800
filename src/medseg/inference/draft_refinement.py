"""An in-context label map refined by the promptable decoder: each object becomes a box prompt.

The in-context engines place objects well but draw their borders coarsely (features on a 1/2 or 1/4 grid);
a SAM-family decoder draws borders well from a box. Each connected component of each label (those holding at
least `MIN_FRACTION` of the label's largest) gives its bounding box; the decoder's masks make the refined label
map. A pixel claimed by several objects goes to the one with the smaller box: an object inside another's box
(a nucleus in its cell, a tumour in its organ) is drawn on top of it, not swallowed by it.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Sequence
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
MAX_OBJECTS = 32  # more objects than this (nuclei, vessel pieces; specks count): the label map is returned as it was


def refine_with_decoder(
    engine: PromptEngine,
    image: Image,
    labels: np.ndarray,
    key: Hashable | None = None,
    values: Collection[int] | None = None,
) -> np.ndarray:
    """``labels`` ``(H, W)`` on the 2D ``image``'s grid, each object of the labels in ``values`` (None: every
    label) redrawn by the decoder from its box; the other labels' pixels are kept as they were, and the redrawn
    objects fill only pixels none of them holds.

    Returns ``labels`` unchanged (a copy) when it holds none of ``values``, is 3D, holds more than
    `MAX_OBJECTS` objects to redraw, or when the image is constant.
    ``key`` names the image for the engine's embedding cache.
    """
    if labels.ndim == 2 and labels.shape != image.shape[:2]:
        raise MedsegError(f"label map of shape {labels.shape} for an image of shape {image.shape[:2]}")
    if labels.ndim != 2 or not labels.any() or constant_value(image.array) is not None:
        return labels.copy()  # a blank image: no borders for the decoder to draw (and the engine refuses it)
    boxes: list[tuple[float, float, float, float]] = []
    objects: list[int] = []
    present = np.unique(labels[labels > 0]).tolist()
    redrawn = [v for v in present if values is None or v in values]
    count = 0  # every object of the redrawn labels, specks included: many objects are not redrawn at all
    for value in redrawn:
        components = ndimage.label(labels == value)[0]
        sizes = np.bincount(components.ravel())[1:]
        count += len(sizes)
        for index, where in enumerate(ndimage.find_objects(components), start=1):
            if where is None or sizes[index - 1] < MIN_FRACTION * sizes.max():
                continue
            rows, cols = where
            boxes.append((float(cols.start), float(rows.start), float(cols.stop), float(rows.stop)))
            objects.append(int(value))
    if not boxes or count > MAX_OBJECTS:
        return labels.copy()
    result = engine.predict(image, Prompts(boxes=boxes), key=key, probabilities=True)
    assert result.probabilities is not None
    refined = np.zeros_like(labels)
    areas = [(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes]
    for index in np.argsort(areas, kind="stable")[::-1].tolist():  # largest box first, smaller ones drawn on top
        refined[result.probabilities[index] > 0.5] = objects[index]
    kept = np.where(np.isin(labels, redrawn), 0, labels)  # the labels not redrawn (none when all are)
    return np.where(kept > 0, kept, refined).astype(labels.dtype)


DECODER_MODES = ("auto", "on", "off")
DEFAULT_DECODER_MODE = "auto"
DECODER_CHECKS = 3  # held-out supports (the last ones) that decide between raw and decoder-refined masks


class DecoderRefinedEngine:
    """An `InContextEngine` whose 2D label maps are redrawn by a promptable engine's decoder
    (`refine_with_decoder`): the in-context engine says where the objects are, the decoder draws them.

    ``mode``: ``"on"`` refines every label of every 2D query; ``"off"`` never; ``"auto"`` refines the labels
    where that predicts the support set better: the last `DECODER_CHECKS` supports are each segmented from the
    others (with the query's options) and scored per label with and without refinement; a label is refined when
    its mean Dice over the held-out supports that show it is higher refined (the decoder draws some structures
    well from a box and others badly: a lung and a heart). Decided once per support set and options; a single
    support cannot be held out, so nothing is refined (chosen leaving each dataset out of eight:
    `benchmarks/incontext_lodo.py`). 3D queries are never refined. Same interface as `InContextEngine`
    (``set_support``, ``predict``, ``support_size``, ``name``).

    Raises:
        MedsegError: an unknown mode.
    """

    def __init__(self, incontext: InContextEngine, decoder: PromptEngine, mode: str = "auto") -> None:
        if mode not in DECODER_MODES:
            raise MedsegError(f"unknown decoder mode {mode!r} (known: {', '.join(DECODER_MODES)})")
        self.incontext, self.decoder, self.mode = incontext, decoder, mode
        self._choice: dict[str, frozenset[int] | None] = {}  # per query options: the labels refined (None: all)
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

    def refined_labels(self, **options: Any) -> frozenset[int] | None:
        """The labels redrawn in 2D queries predicted with ``options``: None for all of them (``on``), an empty set
        for none (``off``, or ``auto`` with one support); ``auto`` decides on held-out supports."""
        if self.mode != "auto":
            return None if self.mode == "on" else frozenset()
        if self._support is None:
            raise MedsegError("set a support set first (set_support)")
        options = {name: value for name, value in options.items() if name != "on_slice"}  # progress: not an option
        key = repr(sorted(options.items()))
        if key not in self._choice:
            images = self._support[0]
            helped = len(images) >= 2 and images[0].ndim == 2
            self._choice[key] = self._labels_helped(options) if helped else frozenset()
        return self._choice[key]

    def predict(self, image: Image, *, probabilities: bool = False, **options: Any) -> Segmentation:
        """As `InContextEngine.predict`; a refined result is named ``<engine>+decoder`` and its probabilities
        are the in-context engine's (the decoder's masks are binary per object)."""
        result = self.incontext.predict(image, probabilities=probabilities, **options)
        values = self.refined_labels(**options) if image.ndim == 2 else frozenset()
        if values is not None and not values:
            return result
        labels = refine_with_decoder(self.decoder, image, result.labels.array, decoder_key(image), values)
        return Segmentation(image.with_array(labels), result.label_values, f"{self.name}+decoder", result.probabilities)

    def _labels_helped(self, options: dict[str, Any]) -> frozenset[int]:
        gains = self.held_out_gains(options)
        return frozenset(v for v, gain in gains.items() if gain and float(np.mean(gain)) > 0)

    def held_out_gains(self, options: dict[str, Any]) -> dict[int, list[float]]:
        """Per label of the support set, the Dice gained by redrawing it on each of the last `DECODER_CHECKS`
        supports that show it, each predicted from the others with ``options`` (what ``auto`` decides on).

        Raises:
            MedsegError: no support set.
        """
        if self._support is None:
            raise MedsegError("set a support set first (set_support)")
        images, labels = self._support
        arrays = [as_label_array(label) if isinstance(label, Image) else np.asarray(label) for label in labels]
        values = sorted({int(v) for array in arrays for v in np.unique(array) if v != 0})
        gains: dict[int, list[float]] = {v: [] for v in values}  # refined Dice - raw Dice, per held-out support
        # the held-out sets keep the whole set's frame (no choice of their own), as the queries have it: the
        # whole set is prepared first (a no-op after a query)
        self.incontext.predict(images[-1], **options)
        with self.incontext.frame_pinned():
            self._held_out_gains(images, labels, arrays, values, gains, options)
        return gains

    def _held_out_gains(
        self,
        images: list[Image],
        labels: list[Image | np.ndarray],
        arrays: list[np.ndarray],
        values: list[int],
        gains: dict[int, list[float]],
        options: dict[str, Any],
    ) -> None:
        try:
            for held in range(max(0, len(images) - DECODER_CHECKS), len(images)):
                others = [i for i in range(len(images)) if i != held]
                self.incontext.set_support([images[i] for i in others], [labels[i] for i in others])
                try:
                    predicted = self.incontext.predict(images[held], **options).labels.array
                except MedsegError:
                    continue  # the others show no foreground: this support decides nothing
                redrawn = refine_with_decoder(self.decoder, images[held], predicted, decoder_key(images[held]))
                for v in values:  # only supports that show the label judge it (an erased label scores 1 else)
                    if (arrays[held] == v).any():
                        gains[v].append(dice(redrawn == v, arrays[held] == v) - dice(predicted == v, arrays[held] == v))
        finally:
            self.incontext.set_support(images, labels)


def decoder_key(image: Image) -> bytes:
    """The decoder's embedding-cache key of an image: its pixels (a query seen again reuses its embedding)."""
    return content_digest([image.array], "decoder")
