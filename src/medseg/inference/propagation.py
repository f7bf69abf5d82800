"""3D segmentation with a 2D promptable model: segment one slice, then propagate slice by slice.

The start slice is segmented from the user's box; each next slice (up, then down) is prompted by the
bounding box of its neighbour's mask. This is the MedSAM / LiteMedSAM 3D inference scheme (Ma et al.
2024; CVPR 2024 "MedSAM on laptop" baseline), with two changes that keep it from drifting:

- the neighbour's box is widened by `MARGIN_PIXELS` of the model's frame plus `MARGIN_FRACTION` of its
  size (the reference widens by 3 pixels; LiteMedSAM was trained on boxes jittered by up to 5 pixels,
  and an object that grows from one slice to the next needs room), and kept inside the user's 3D box;
- a slice whose prompt gives an empty mask is retried with the user's box (the object was lost, not
  ended), and the next slice continues from the last mask found.

With a 3D box, propagation covers the box's slices. A box-prompted SAM returns a blob even where
nothing is, so for a prompt without a z extent (a 2D box or clicks on one slice) medseg adds a
heuristic stop rule: the object ends where its mask no longer stands out from its surroundings (its
contrast with a ring around it falls below `MIN_RELATIVE_CONTRAST` of the start slice's), or where the
mask is empty.

`vote_planes` is the other way to use a 3D box: its extent as a box on every slice through it along each
of the three axes (the slices of its z range, its rows, its columns); a voxel belongs to the object where
at least two of the three planes say so. It costs the embeddings of all three stacks and needs voxels of
similar size along the three axes (the model sees the row and column slices as images).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy import ndimage

from medseg.errors import MedsegError
from medseg.inference.prompt_predictor import PromptPredictor, clip_to_box

# A slice's object must keep this fraction of the start slice's inside-vs-ring contrast.
MIN_RELATIVE_CONTRAST = 0.3
# Three-plane voting embeds every this-many-th row and column slice; the others take the nearest one's logits.
PLANE_STRIDE = 3
# The neighbour's mask box is widened by this many pixels of the model's frame plus this fraction of its size.
MARGIN_PIXELS = 5.0
MARGIN_FRACTION = 0.1
_RING_PIXELS = 3


@dataclass(frozen=True)
class VolumePrompt:
    """One object in a volume ``(z, y, x)``: a 2D box ``(x0, y0, x1, y1)`` in voxel indices on slice
    ``start_slice``, optionally limited to slices ``z_range = (z0, z1)`` (inclusive), and optional
    clicks ``(x, y)`` with labels on the start slice."""

    box: tuple[float, float, float, float] | None
    start_slice: int
    z_range: tuple[int, int] | None = None
    points: tuple[tuple[float, float], ...] = ()
    point_labels: tuple[int, ...] = ()

    @classmethod
    def from_box3d(cls, box3d: tuple[float, ...]) -> VolumePrompt:
        """``(x0, y0, z0, x1, y1, z1)`` voxel indices (z inclusive): start in the middle slice."""
        x0, y0, z0, x1, y1, z1 = box3d
        if z0 > z1:
            raise MedsegError(f"3D box {box3d} is inverted along z (z0 > z1)")
        return cls((x0, y0, x1, y1), round((z0 + z1) / 2), (int(z0), int(z1)))


def bounding_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` of a non-empty 2D mask, in pixel edges (x1, y1 exclusive)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


class Slices(Protocol):
    """A volume's slices: ``shape`` ``(Z, H, W[, C])`` and ``slices[z]`` -> ``(H, W[, C])`` (an array, or
    slices made on demand such as `medseg.inference.prompt_input.ModelSlices`)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, z: int, /) -> np.ndarray: ...


class PlaneSlices(Slices, Protocol):
    """`Slices` that also give a slice along axis 1 (a row, ``(Z, W[, C])``) or 2 (a column, ``(Z, H[, C])``)."""

    def along(self, axis: int, index: int) -> np.ndarray: ...


def propagate(
    predictor: PromptPredictor,
    slices: Slices | np.ndarray,
    prompt: VolumePrompt,
    on_slice: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Logits ``(Z, H, W)`` float32 of one object (``-inf`` on slices not reached); as `propagate_slices`."""
    return full_logits(propagate_slices(predictor, slices, prompt, on_slice), tuple(slices.shape[:3]))


def propagate_slices(
    predictor: PromptPredictor,
    slices: Slices | np.ndarray,
    prompt: VolumePrompt,
    on_slice: Callable[[int], None] | None = None,
) -> dict[int, np.ndarray]:
    """Logits ``(H, W)`` float32 of one object on each slice reached, by slice index (memory follows the
    slices reached, not the volume).

    Args:
        predictor: a loaded predictor (give it ``cache_size`` to reuse slice embeddings across objects).
        slices: ``(Z, H, W)`` or ``(Z, H, W, 3)``, intensities already windowed/normalised.
        prompt: where the object is.
        on_slice: called with each slice index segmented (progress).

    Raises:
        MedsegError: the start slice or z range lies outside the volume, or a prompt is invalid.
    """
    depth = slices.shape[0]
    if not 0 <= prompt.start_slice < depth:
        raise MedsegError(f"slice {prompt.start_slice} is outside the volume's {depth} slices")
    low, high = prompt.z_range if prompt.z_range is not None else (0, depth - 1)
    if low < 0 or high >= depth:
        raise MedsegError(f"z range {low}..{high} is outside the volume's {depth} slices (0..{depth - 1})")
    plane = tuple(slices.shape[1:3])
    start_pixels = slices[prompt.start_slice]
    start = clip_to_box(_segment_slice(predictor, start_pixels, prompt.start_slice, prompt.box, prompt), prompt.box)
    inside = prompt.box if prompt.z_range is not None else None  # a 3D box bounds every slice
    if on_slice is not None:
        on_slice(prompt.start_slice)
    logits = {prompt.start_slice: start}
    if not (start > 0).any():
        return logits
    reference = contrast(start_pixels, start > 0)
    for step in (1, -1):
        previous = start > 0
        z = prompt.start_slice + step
        while low <= z <= high:
            pixels = slices[z]
            box = widened(bounding_box(previous), predictor, plane, inside)
            current = clip_to_box(_segment_slice(predictor, pixels, z, box, None), inside)
            if not (current > 0).any() and prompt.z_range is not None and prompt.box is not None:
                # Inside a 3D box, a lost object is retried with the user's box.
                current = clip_to_box(_segment_slice(predictor, pixels, z, prompt.box, None), inside)
            if on_slice is not None:
                on_slice(z)
            found = current > 0
            if prompt.z_range is None and (not found.any() or _faded(pixels, found, reference)):
                break
            logits[z] = current
            if found.any():
                previous = found
            z += step
    return logits


def vote_planes(
    predictor: PromptPredictor,
    slices: PlaneSlices | np.ndarray,
    box3d: tuple[float, float, float, float, float, float],
    on_slice: Callable[[int], None] | None = None,
) -> dict[int, np.ndarray]:
    """Logits ``(H, W)`` float32 of one object on each slice ``z0..z1`` of a 3D box, from three planes.

    The box ``(x0, y0, z0, x1, y1, z1)`` (x/y pixel edges, z inclusive) is given as a 2D box to the slices it
    crosses along each axis: every slice ``z0..z1`` gets ``(x0, y0, x1, y1)``; every `PLANE_STRIDE`-th row
    ``(x0, z0, x1, z1 + 1)`` and column ``(y0, z0, y1, z1 + 1)``, the rows and columns between taking the
    nearest one's logits (as accurate as every one on structures the benchmark does not report:
    ``benchmarks/propagation_rules.py``). A voxel's logit is the median of its three (positive where at
    least two planes call it the object); outside the box, ``-inf``.

    Args:
        predictor: a loaded predictor (its cache, when sized, is keyed ``z``, ``("row", y)``, ``("column", x)``).
        slices: ``(Z, H, W[, 3])`` intensities as for `propagate_slices`; anything but an array must have
            ``along(axis, index)``.
        on_slice: called once per slice embedded, in any of the three stacks.

    Raises:
        MedsegError: the box lies outside the volume or is empty.
    """
    depth, height, width = (int(n) for n in slices.shape[:3])
    x0, y0, z0, x1, y1, z1 = box3d
    rows, cols = (
        range(max(int(y0), 0), min(int(np.ceil(y1)), height)),
        range(max(int(x0), 0), min(int(np.ceil(x1)), width)),
    )
    zs = range(int(z0), int(z1) + 1)
    if not (0 <= z0 <= z1 < depth) or not rows or not cols:
        raise MedsegError(f"3D box {box3d} does not fit the volume of shape {(depth, height, width)}")
    votes = np.empty((3, len(zs), len(rows), len(cols)), np.float32)
    for k, z in enumerate(zs):
        part = _plane_logits(predictor, slices[z], z, (x0, y0, x1, y1), on_slice)
        votes[0, k] = part[rows.start : rows.stop, cols.start : cols.stop]
    for y, nearest in _every_stride(rows).items():
        part = _plane_logits(predictor, _along(slices, 1, y), ("row", y), (x0, z0, x1, z1 + 1), on_slice)
        votes[1][:, nearest, :] = part[zs.start : zs.stop, None, cols.start : cols.stop]
    for x, nearest in _every_stride(cols).items():
        part = _plane_logits(predictor, _along(slices, 2, x), ("column", x), (y0, z0, y1, z1 + 1), on_slice)
        votes[2][:, :, nearest] = part[zs.start : zs.stop, rows.start : rows.stop, None]
    median = np.median(votes, axis=0)
    out = {}
    for k, z in enumerate(zs):
        plane = np.full((height, width), -np.inf, np.float32)
        plane[rows.start : rows.stop, cols.start : cols.stop] = median[k]
        out[z] = plane
    return out


def embedded_slices(box3d: tuple[float, ...], planes: int) -> int:
    """How many slices a 3D box ``(x0, y0, z0, x1, y1, z1)`` has embedded: its z range (``planes`` 1, as
    `propagate_slices` reaches at most), and with ``planes`` 3 the rows and columns `vote_planes` embeds."""
    x0, y0, z0, x1, y1, z1 = box3d
    count = int(z1) - int(z0) + 1
    if planes == 1:
        return count
    rows, cols = int(np.ceil(y1)) - int(y0), int(np.ceil(x1)) - int(x0)
    return count + -(-rows // PLANE_STRIDE) + -(-cols // PLANE_STRIDE)


def _every_stride(indices: range) -> dict[int, list[int]]:
    """Every `PLANE_STRIDE`-th of ``indices`` (evenly spread, both ends included) -> the positions in ``indices``
    that take its logits (those nearest to it)."""
    count = -(-len(indices) // PLANE_STRIDE)
    chosen = np.unique(np.linspace(0, len(indices) - 1, count).round().astype(int))
    nearest = np.abs(np.arange(len(indices))[:, None] - chosen[None]).argmin(axis=1)
    return {indices[int(c)]: np.flatnonzero(nearest == i).tolist() for i, c in enumerate(chosen)}


def _along(slices: PlaneSlices | np.ndarray, axis: int, index: int) -> np.ndarray:
    if isinstance(slices, np.ndarray):
        return np.take(slices, index, axis=axis)
    return slices.along(axis, index)


def _plane_logits(
    predictor: PromptPredictor,
    pixels: np.ndarray,
    key: object,
    box: tuple[float, float, float, float],
    on_slice: Callable[[int], None] | None,
) -> np.ndarray:
    predictor.set_image(pixels, key=key)
    if on_slice is not None:
        on_slice(key if isinstance(key, int) else key[1])  # type: ignore[index]
    return clip_to_box(predictor.predict(boxes=[list(box)]).logits[0], box)


def full_logits(per_slice: dict[int, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """``(Z, H, W)`` float32 from `propagate_slices`' logits, ``-inf`` on the slices not in ``per_slice``."""
    logits = np.full(shape, -np.inf, np.float32)
    for z, one in per_slice.items():
        logits[z] = one
    return logits


def widened(
    box: tuple[float, float, float, float],
    predictor: PromptPredictor,
    shape: tuple[int, ...],
    inside: tuple[float, float, float, float] | None,
) -> tuple[float, float, float, float]:
    """``box`` widened by `MARGIN_PIXELS` model-frame pixels plus `MARGIN_FRACTION` of its larger side, within
    the image ``shape`` ``(H, W)`` and the box ``inside`` (when given)."""
    height, width = shape[:2]
    frame = getattr(predictor, "spec", None)
    pixels = max(height, width) / frame.image_size if frame is not None else 1.0  # image pixels per frame pixel
    x0, y0, x1, y1 = box
    margin = MARGIN_PIXELS * pixels + MARGIN_FRACTION * max(x1 - x0, y1 - y0)
    limit = inside if inside is not None else (0.0, 0.0, float(width), float(height))
    return (
        max(x0 - margin, limit[0], 0.0),
        max(y0 - margin, limit[1], 0.0),
        min(x1 + margin, limit[2], float(width)),
        min(y1 + margin, limit[3], float(height)),
    )


def contrast(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean intensity inside ``mask`` minus the mean in a ring of `_RING_PIXELS` around it (channels averaged)."""
    grey = image.mean(axis=-1) if image.ndim == 3 else image
    ring = ndimage.binary_dilation(mask, iterations=_RING_PIXELS) & ~mask
    if not ring.any():
        return 0.0
    return float(grey[mask].mean() - grey[ring].mean())


def _faded(image: np.ndarray, mask: np.ndarray, reference: float) -> bool:
    """True when the mask's contrast has fallen below `MIN_RELATIVE_CONTRAST` of the start slice's."""
    return contrast(image, mask) * np.sign(reference) < MIN_RELATIVE_CONTRAST * abs(reference)


def merge_objects(object_logits: list[np.ndarray], labels: list[int] | None = None) -> np.ndarray:
    """One label map from per-object logits: each voxel goes to the object with the highest positive logit.

    ``labels[i]`` is the value of object ``i`` (default ``i + 1``); the result is uint8 (uint16 above 255).
    """
    values = labels or list(range(1, len(object_logits) + 1))
    stacked = np.stack(object_logits)
    best = stacked.argmax(axis=0)
    out = np.asarray(values)[best].astype(np.uint16 if max(values) > 255 else np.uint8)
    out[stacked.max(axis=0) <= 0] = 0
    return out


def merge_slices(
    objects: list[dict[int, np.ndarray]], shape: tuple[int, ...], labels: list[int] | None = None
) -> np.ndarray:
    """`merge_objects` of `propagate_slices`' per-slice logits, one slice at a time: the label map ``shape``
    ``(Z, H, W)`` without any ``(Z, H, W)`` float array."""
    values = labels or list(range(1, len(objects) + 1))
    out = np.zeros(shape, np.uint16 if max(values, default=0) > 255 else np.uint8)
    empty = np.full(shape[1:], -np.inf, np.float32)
    for z in sorted({z for one in objects for z in one}):
        out[z] = merge_objects([one.get(z, empty) for one in objects], values)
    return out


def _segment_slice(
    predictor: PromptPredictor,
    pixels: np.ndarray,
    z: int,
    box: tuple[float, float, float, float] | None,
    clicks: VolumePrompt | None,
) -> np.ndarray:
    predictor.set_image(pixels, key=z)
    if clicks is not None and clicks.points:
        points = [list(p) for p in clicks.points]
        result = predictor.predict_with_clicks(None if box is None else list(box), points, list(clicks.point_labels))
    else:
        if box is None:
            raise MedsegError(f"slice {z}: no box and no clicks to segment from")
        result = predictor.predict(boxes=[list(box)])
    return result.logits[0]
