"""`InContextPredictor`: a support set of labelled examples defines the task; every query gets a label map
on its own grid, in one forward pass per batch of queries (no training; UniverSeg, Butoi et al. 2023).

Model frame: grey ``S x S`` images (``input_size``, 128 for UniverSeg v1) min-max normalised to [0, 1]
after clipping to the 0.5-99.5 percentiles; RGB is averaged to grey; images are stretched to the square
(the aspect ratio is restored on the way back). Multi-class: every foreground label of the support set is
one binary task (its mask against everything else), all labels in one batch; a pixel takes the label of
highest probability where that probability is at least 0.5, else background.

Post-processing (``largest_component``, on by default): where the support set shows the foreground, or a
label, as a single object, only the largest connected component of the query's is kept, unless (2D supports)
that lowers the Dice of the engine's own predictions of the supports (`medseg.inference.components`:
nnU-Net's "remove all but the largest component", decided from the support set).

3D: a query volume is segmented slice by slice along array axis 0. With support *volumes*, each query
slice gets, from every support volume, the slice at the same relative position (``(z + 0.5) / Z``) and
``neighbours`` slices either side (`_volume_probabilities`, which `FeatureMatchingPredictor`'s probe replaces
by one position-aware fit per label); 2D support images serve every query slice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import MedsegError
from medseg.inference.components import SingleObjectRule
from medseg.io.image import label_array
from medseg.preprocessing.frames import label_masks, model_frame, unit_range  # noqa: F401 (unit_range: re-exported)
from medseg.runtime import tune_allocator

CHECKED_SUPPORTS = 8  # 2D supports the engine predicts to confirm the largest-component rule
# Support volumes: None matches each query slice on its own (one probe fit per slice and label); a number of
# relative-position bins is several times faster and lost a little Dice on Hippocampus (README, in-context).
DEFAULT_SLICE_BINS: int | None = None
DEFAULT_SUPPORT_SCALES = False
RESULT_SLICES = 8  # slices brought back to the query's grid at a time
ZOOM = 1.5  # `scaled_supports`: a crop of 1/ZOOM of each side (zoom in) and a pad to ZOOM times it (zoom out)


@dataclass
class InContextResult:
    """``labels`` ``(*spatial)`` uint8 (a wider unsigned type for larger label values: the support set's) and
    ``probabilities`` ``(K, *spatial)`` float32, one per label in ``label_values`` order, on the query's grid
    (before the largest-component post-processing, which only ``labels`` has had)."""

    labels: np.ndarray
    probabilities: np.ndarray
    label_values: list[int]


@dataclass
class PreparedSupport:
    """A checked support set: ``key`` (a digest of its contents; None when not all are numpy arrays), its
    label maps as integer arrays, the foreground ``values`` in order, and for 2D supports the stacked
    ``frames`` and ``masks`` the network takes (None for volumes: their slices are matched per query slice),
    the `SingleObjectRule` of its label maps (``single_objects``) and, for 2D supports, that rule as the
    engine's predictions of the supports confirm it, per (ensemble, subset size, seed) (``confirmed``)."""

    key: bytes | None
    labels: list[np.ndarray]
    values: list[int]
    frames: np.ndarray | None
    masks: np.ndarray | None
    single_objects: SingleObjectRule
    confirmed: dict[tuple[int, int | None, int], SingleObjectRule] = field(default_factory=dict)


class InContextPredictor:
    """Wraps an in-context network ``(query (B, 1, S, S), support images (B, N, 1, S, S), support masks
    (B, N, 1, S, S)) -> logits (B, 1, S, S)``, e.g. `medseg.models.incontext.UniverSeg`."""

    def __init__(self, model: nn.Module, input_size: int = 128, device: str = "cpu", batch_size: int = 8) -> None:
        tune_allocator()
        self.model = model.to(device).eval()
        self.input_size = input_size
        self.device = torch.device(device)
        self.batch_size = batch_size
        # 2D supports also shown zoomed in and out (`scaled_supports`): queries' objects may differ in size
        self.support_scales = DEFAULT_SUPPORT_SCALES
        self._prepared: PreparedSupport | None = None  # the last support set, checked and framed

    @classmethod
    def from_weights(cls, path: str | Path, device: str = "cpu") -> InContextPredictor:
        """Load ``weights.pt`` from ``medseg train-incontext`` ({"architecture", "state_dict"}) or the official
        UniverSeg v1 state_dict (``universeg_v1_nf64_ss64_STA.pt``, 128 x 128 inputs).

        Raises:
            MedsegError: missing or unreadable file, or weights of another network.
        """
        from medseg.models.incontext import UniverSeg, universeg_v1

        file = Path(path)
        if not file.is_file():
            raise MedsegError("no such weights file", file)
        try:
            saved = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:  # corrupt files raise many types
            raise MedsegError(f"cannot read weights ({type(error).__name__})", file) from None
        if not isinstance(saved, dict):
            raise MedsegError("not a state_dict", file)
        if "architecture" in saved and "state_dict" in saved:
            blocks = [(int(a), int(b)) for a, b in saved["architecture"]["encoder_blocks"]]
            model, size, state = UniverSeg(blocks), int(saved["architecture"]["size"]), saved["state_dict"]
        else:
            model, size, state = universeg_v1(), 128, saved
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), "")[:160]
            raise MedsegError(f"not UniverSeg weights medseg knows ({detail})", file) from None
        return cls(model, size, device)

    def predict(
        self,
        query: np.ndarray,
        support_images: Sequence[np.ndarray],
        support_labels: Sequence[np.ndarray],
        query_is_volume: bool = False,
        support_are_volumes: bool = False,
        ensemble: int = 1,
        subset_size: int | None = None,
        neighbours: int = 1,
        seed: int = 0,
        largest_component: bool = True,
        slice_bins: int | None = DEFAULT_SLICE_BINS,
        on_slice: Callable[[int, int], None] | None = None,
    ) -> InContextResult:
        """Segment ``query`` with the task the support set defines.

        Args:
            query: ``(H, W)``, ``(H, W, 3)``, or with ``query_is_volume`` ``(Z, H, W)``.
            support_images: each ``(H_i, W_i)`` / ``(H_i, W_i, 3)``, or volumes ``(Z_i, H_i, W_i)`` with
                ``support_are_volumes``; sizes may differ.
            support_labels: integer label maps on the grid of the matching support image.
            ensemble: average over this many random support subsets of ``subset_size`` (seeded).
            neighbours: for support volumes, slices taken either side of the matched one.
            slice_bins: for support volumes, cut the relative position ``[0, 1)`` into this many equal bins: every
                query slice of a bin is segmented from the support slices of that bin (plus ``neighbours``
                either side), so the bin's slices share one support set (one probe fit per bin and label).
                None: each query slice has its own matched slices.
            on_slice: 3D queries: called with ``(z, depth)`` after each slice (progress).
            largest_component: keep only the largest connected component of the foreground and of each
                label that the support set shows as one object (`SingleObjectRule`; 3D components for
                support volumes; for 2D supports, per slice of a 3D query and only the steps that do not
                lower the Dice of the engine's predictions of the first `CHECKED_SUPPORTS` supports).

        Raises:
            MedsegError: a query or support image that is not a real-valued array of the expected
                dimensionality, a label map that is not integer and non-negative,
                an ensemble or subset size below 1 or negative neighbours, an empty support set,
                images and labels that do not pair up, label maps on
                another grid than their image, supports of mixed dimensionality, 3D supports for a 2D
                query, or a support set with no foreground at all.
        """
        check_ensemble_options(ensemble, subset_size, neighbours)
        if slice_bins is not None and (
            not isinstance(slice_bins, int) or isinstance(slice_bins, bool) or slice_bins < 1
        ):
            raise MedsegError(f"slice_bins must be None or a whole number >= 1, not {slice_bins!r}")
        if not isinstance(largest_component, bool):
            raise MedsegError(f"largest_component must be True or False, not {largest_component!r}")
        _check_image(query, query_is_volume, "the query", "query_is_volume")
        if not support_images:
            raise MedsegError("the support set is empty")
        if len(support_images) != len(support_labels):
            raise MedsegError(f"{len(support_images)} support images but {len(support_labels)} label maps")
        if support_are_volumes and not query_is_volume:
            raise MedsegError("3D support volumes need a 3D query (a 2D query takes 2D support images)")
        support = self._prepare(support_images, support_labels, support_are_volumes)
        values = support.values
        if not query_is_volume:
            assert support.frames is not None and support.masks is not None  # 2D supports for a 2D query
            probabilities = self._run([self.frame(query)], support.frames, support.masks, ensemble, subset_size, seed)
            result = self._result(probabilities[0], query.shape[:2], values)
            if largest_component:
                result.labels = self._confirmed_rule(support, ensemble, subset_size, seed).apply(result.labels)
            return result
        if support_are_volumes:
            probabilities = self._volume_probabilities(
                query, support_images, support, ensemble, subset_size, seed, neighbours, slice_bins, on_slice
            )
        else:
            assert support.frames is not None and support.masks is not None  # 2D supports for every slice
            slices = []
            for z in range(query.shape[0]):
                slices.append(
                    self._run([self.frame(query[z])], support.frames, support.masks, ensemble, subset_size, seed)[0]
                )
                if on_slice is not None:
                    on_slice(z, query.shape[0])
            probabilities = np.stack(slices, axis=1)
        result = self._result(probabilities, query.shape[1:3], values)
        if largest_component:  # objects in 3D for support volumes (the labels' rule); per slice for 2D supports
            if support_are_volumes:
                result.labels = support.single_objects.apply(result.labels)
            else:
                rule = self._confirmed_rule(support, ensemble, subset_size, seed)
                result.labels = np.stack([rule.apply(plane) for plane in result.labels])
        return result

    def _prepare(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], volumes: bool) -> PreparedSupport:
        """The support set checked, its label values found and (2D) framed: once per support set, reused while
        the same contents come again (a folder of queries shares one support set)."""
        key = content_key([*images, *labels], f"{volumes},{self.support_scales},{self.input_size}")
        if key is not None and self._prepared is not None and self._prepared.key == key:
            return self._prepared
        checked = [label_array(label, f"support label map {i}") for i, label in enumerate(labels)]
        for i, (image, label) in enumerate(zip(images, checked, strict=True)):
            _check_image(image, volumes, f"support {i}", "support_are_volumes")
            spatial = image.shape[: 3 if volumes else 2]
            if label.shape != spatial:
                raise MedsegError(f"support {i}: label map {label.shape} is not on its image's grid {spatial}")
        values = sorted({int(v) for label in checked for v in np.unique(label) if v != 0})
        if not values:
            raise MedsegError("no foreground in any support label map: nothing defines the task")
        frames = masks = None
        if not volumes:  # 2D supports: framed once, for a 2D query or every slice of a 3D one
            pairs = list(zip(images, checked, strict=True))
            if self.support_scales:  # after the originals: `_confirmed_rule` predicts the first supports
                pairs += [scaled for image, label in pairs for scaled in scaled_supports(image, label)]
            frames = np.stack([self.frame(image) for image, _ in pairs])
            masks = np.stack([self.label_masks(label, values) for _, label in pairs])
        # kept for later queries: copies, so that the caller editing its arrays cannot change them
        checked = [label.copy() for label in checked]
        rule = SingleObjectRule.from_supports(checked, values)
        prepared = PreparedSupport(key, checked, values, frames, masks, rule)
        self._prepared = prepared if key is not None else None
        return prepared

    def _confirmed_rule(
        self, support: PreparedSupport, ensemble: int, subset_size: int | None, seed: int
    ) -> SingleObjectRule:
        """The 2D support set's `SingleObjectRule` confirmed on the engine's predictions of its first
        `CHECKED_SUPPORTS` images (with the query's options, so the same fits serve), once per support set and
        options."""
        rule, options = support.single_objects, (int(ensemble), subset_size, int(seed))
        if not (rule.foreground or rule.values):
            return rule
        if options in support.confirmed:
            return support.confirmed[options]
        assert support.frames is not None and support.masks is not None
        checked = range(min(CHECKED_SUPPORTS, len(support.labels)))
        predictions = []
        for i in checked:
            probabilities = self._run([support.frames[i]], support.frames, support.masks, ensemble, subset_size, seed)
            predictions.append(self._result(probabilities[0], support.labels[i].shape, support.values).labels)
        truths = [support.labels[i] for i in checked]
        support.confirmed[options] = rule.confirmed(predictions, truths, support.values)
        return support.confirmed[options]

    def _volume_probabilities(
        self,
        query: np.ndarray,
        volumes: Sequence[np.ndarray],
        support: PreparedSupport,
        ensemble: int,
        subset_size: int | None,
        seed: int,
        neighbours: int,
        slice_bins: int | None,
        on_slice: Callable[[int, int], None] | None,
    ) -> np.ndarray:
        """Probabilities ``(K, Z, S, S)`` of a query volume from support volumes: each query slice from the
        support slices at its relative position (`_matched_slices`; with ``slice_bins``, a bin's slices share
        them)."""
        slices = []
        matched: dict[tuple[float, float], tuple[np.ndarray, np.ndarray]] = {}  # the current bin's (slices in order)
        for z in range(query.shape[0]):
            span = _bin_of((z + 0.5) / query.shape[0], slice_bins)
            if span not in matched:
                matched = {span: self._matched_slices(span, volumes, support.labels, support.values, neighbours)}
            images, masks = matched[span]
            slices.append(self._run([self.frame(query[z])], images, masks, ensemble, subset_size, seed)[0])
            if on_slice is not None:
                on_slice(z, query.shape[0])
        return np.stack(slices, axis=1)

    def _matched_slices(
        self,
        span: tuple[float, float],
        volumes: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        values: list[int],
        neighbours: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Frames and masks of each support volume's slices whose relative position lies in ``span`` (at least
        the slice at its start), plus ``neighbours`` either side."""
        images, masks = [], []
        for volume, label in zip(volumes, labels, strict=True):
            depth = volume.shape[0]
            first = min(depth - 1, int(span[0] * depth))  # the slice at the same relative position
            last = max(first, min(depth - 1, int(np.ceil(span[1] * depth)) - 1))
            for z in range(max(0, first - neighbours), min(depth, last + neighbours + 1)):
                images.append(self.frame(volume[z]))
                masks.append(self.label_masks(label[z], values))
        return np.stack(images), np.stack(masks)

    @contextmanager
    def frame_pinned(self) -> Iterator[None]:
        """Within it, support sets are framed at the current side (a subset of a support set whose side was
        chosen keeps it: no choice made again per subset). The frame side is fixed here: nothing to pin."""
        yield

    def frame(self, image: np.ndarray) -> np.ndarray:
        """One 2D image ``(H, W[, C])`` as the network takes it (subclasses: their own frame)."""
        return model_frame(image, self.input_size)

    def label_masks(self, label: np.ndarray, values: list[int]) -> np.ndarray:
        """Binary masks of ``label == v`` for each of ``values`` on the network's grid."""
        return label_masks(label, values, self.input_size)

    @torch.no_grad()
    def _run(
        self,
        queries: list[np.ndarray],
        images: np.ndarray,
        masks: np.ndarray,
        ensemble: int,
        subset_size: int | None,
        seed: int,
    ) -> np.ndarray:
        """Probabilities ``(Q, K, S, S)`` for queries ``(S, S)``, supports ``(N, S, S)`` and masks ``(N, K, S, S)``."""
        n, k = masks.shape[:2]
        subsets = support_subsets(n, ensemble, subset_size, np.random.default_rng(seed))
        query = torch.from_numpy(np.stack(queries))[:, None].to(self.device)  # (Q, 1, S, S)
        total = torch.zeros(len(queries), k, self.input_size, self.input_size)
        for subset in subsets:
            support = torch.from_numpy(images[subset])[:, None].to(self.device)  # (N', 1, S, S)
            label_masks = torch.from_numpy(masks[subset]).to(self.device)  # (N', K, S, S)
            for q in range(len(queries)):
                for start in range(0, k, self.batch_size):
                    stop = min(k, start + self.batch_size)
                    b = stop - start
                    logits = self.model(
                        query[q : q + 1].expand(b, -1, -1, -1),
                        support[None].expand(b, -1, -1, -1, -1),
                        label_masks[:, start:stop].permute(1, 0, 2, 3)[:, :, None],
                    )
                    total[q, start:stop] += torch.sigmoid(logits[:, 0]).cpu()
        return (total / len(subsets)).numpy()

    def _result(self, probabilities: np.ndarray, shape: tuple[int, ...], values: list[int]) -> InContextResult:
        """Back to the query's ``(H, W)`` per slice; ``probabilities`` is ``(K, S, S)`` or ``(K, Z, S, S)``."""
        tensor = torch.from_numpy(probabilities)
        volume = tensor.ndim == 4
        planes = tensor.permute(1, 0, 2, 3) if volume else tensor[None]  # (Z, K, S, S)
        depth, count = planes.shape[:2]
        dtype = np.min_scalar_type(max(values))  # uint8 up to 255, then uint16, uint32, uint64
        probs = np.empty((count, depth, *shape), np.float32)
        labels = np.empty((depth, *shape), dtype)
        for start in range(0, depth, RESULT_SLICES):  # a few slices at a time: a large volume's peak memory
            chunk = planes[start : start + RESULT_SLICES].float()
            back = F.interpolate(chunk, tuple(shape), mode="bilinear", align_corners=False).clamp_(0, 1).numpy()
            stop = start + len(back)
            probs[:, start:stop] = back.transpose(1, 0, 2, 3)
            best = np.asarray(values)[back.argmax(axis=1)]
            labels[start:stop] = np.where(back.max(axis=1) >= 0.5, best, 0)
        return InContextResult(labels if volume else labels[0], probs if volume else probs[:, 0], values)


def scaled_supports(image: np.ndarray, label: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """A 2D support ``(H, W[, C])`` and its label map zoomed in and out by `ZOOM` (frames are stretched to the
    model's square, so a crop is a zoom): a crop of ``1/ZOOM`` of each side centred on the foreground (clamped to
    the image), and the image padded by edge replication to ``ZOOM`` times each side (the label map with 0).

    Few-shot segmenters see the supports' objects at one size; queries' objects may be larger or smaller
    (scale augmentation of the support set, as in training-time augmentation of segmentation networks).
    """
    height, width = label.shape
    rows, cols = np.nonzero(label)
    centre = (rows.mean(), cols.mean()) if len(rows) else (height / 2, width / 2)
    crop = [max(1, round(side / ZOOM)) for side in (height, width)]
    sides = zip(centre, crop, (height, width), strict=True)
    start = [int(np.clip(round(c - n / 2), 0, side - n)) for c, n, side in sides]
    window = (slice(start[0], start[0] + crop[0]), slice(start[1], start[1] + crop[1]))
    pad = [(round(side * (ZOOM - 1) / 2),) * 2 for side in (height, width)]
    channels = [(0, 0)] * (image.ndim - 2)
    padded = np.pad(image, [*pad, *channels], mode="edge"), np.pad(label, pad)
    return [(np.ascontiguousarray(image[window]), np.ascontiguousarray(label[window])), padded]


def bins_option(slice_bins: int | None) -> dict[str, Any]:
    """``predict``'s ``slice_bins`` keyword from a command's ``--slice-bins``: none given (the default), 0 (each
    slice on its own: None) or N."""
    return {} if slice_bins is None else {"slice_bins": slice_bins or None}


def _bin_of(position: float, bins: int | None) -> tuple[float, float]:
    """The span of relative positions a query slice at ``position`` is matched with: its own point, or its bin."""
    if bins is None:
        return position, position
    index = min(bins - 1, int(position * bins))
    return index / bins, (index + 1) / bins


def _check_image(image: np.ndarray, volume: bool, name: str, flag: str) -> None:
    """Raises MedsegError unless ``image`` is a real-valued array ``(Z, H, W)`` (``volume``) or ``(H, W)`` /
    ``(H, W, C)`` with at most 4 channels, every side at least 1."""
    if not isinstance(image, np.ndarray) or image.dtype.kind not in "biuf":
        kind = image.dtype if isinstance(image, np.ndarray) else type(image).__name__
        raise MedsegError(f"{name} must be a real-valued numpy array, not {kind}")
    planar = image.ndim == 2 or (image.ndim == 3 and image.shape[-1] <= 4)
    if (volume and image.ndim != 3) or (not volume and not planar):
        expected = "a volume (Z, H, W)" if volume else "a 2D image (H, W) or (H, W, C) with C <= 4"
        hint = f" (a volume needs {flag}=True)" if not volume and image.ndim == 3 else ""
        raise MedsegError(f"{name} has shape {image.shape}, expected {expected}{hint}")
    if 0 in image.shape:
        raise MedsegError(f"{name} is empty (shape {image.shape})")
    if image.dtype.kind == "f" and not np.isfinite(image).any():
        raise MedsegError(f"{name} has no finite values (all NaN or infinite)")


def content_key(arrays: Sequence[np.ndarray], extra: str) -> bytes | None:
    """`content_digest` of the arrays; None unless all are numpy arrays."""
    if not all(isinstance(array, np.ndarray) for array in arrays):
        return None
    return content_digest(arrays, extra)


def content_digest(arrays: Sequence[np.ndarray], extra: str) -> bytes:
    """A 16-byte BLAKE2b digest of the arrays' shapes, dtypes and bytes, and of ``extra``."""
    digest = hashlib.blake2b(extra.encode(), digest_size=16)
    for array in arrays:
        contiguous = np.ascontiguousarray(array)
        digest.update(f"{array.shape}{array.dtype.str}".encode())
        digest.update(contiguous.data if contiguous.size else b"")
    return digest.digest()


def check_ensemble_options(ensemble: int, subset_size: int | None, neighbours: int) -> None:
    """Raises MedsegError unless the three are integers, ``ensemble >= 1``, ``subset_size`` is None or ``>= 1``
    and ``neighbours >= 0``."""
    values = (ensemble, neighbours, 1 if subset_size is None else subset_size)
    if not all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values):
        raise MedsegError("ensemble, subset size and neighbours must be integers")
    if ensemble < 1 or (subset_size is not None and subset_size < 1) or neighbours < 0:
        raise MedsegError("--ensemble and --subset-size must be at least 1 and --neighbours at least 0")


def support_subsets(n: int, ensemble: int, subset_size: int | None, rng: np.random.Generator) -> list[np.ndarray]:
    """Indices of the support subsets whose answers are averaged: all ``n`` supports, or ``ensemble``
    random subsets of ``subset_size`` (drawn from ``rng``) when both are given and the subset is smaller."""
    if ensemble <= 1 or subset_size is None or subset_size >= n:
        return [np.arange(n)]
    return [rng.choice(n, subset_size, replace=False) for _ in range(ensemble)]
