"""Prompts on a medical image -> a label map on the image's grid (what ``medseg prompt`` runs)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from medseg.errors import MedsegError
from medseg.inference.prompt_input import ModelSlices, intensity_preset, model_input
from medseg.inference.prompt_predictor import PromptPredictor, check_box, check_finite, check_point, clip_to_box
from medseg.inference.propagation import (
    VolumePrompt,
    full_logits,
    merge_objects,
    merge_slices,
    propagate_slices,
    vote_planes,
)
from medseg.io import Image
from medseg.preprocessing.statistics import constant_value

__all__ = ["Prompts", "intensity_preset", "model_input", "segment", "segment_logits"]  # the first two from prompt_input


@dataclass
class Prompts:
    """What the user gave, in voxel/pixel indices of the input (x = column, y = row, z = slice)."""

    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    boxes3d: list[tuple[float, float, float, float, float, float]] = field(default_factory=list)
    points: list[tuple[float, float]] = field(default_factory=list)
    point_labels: list[int] = field(default_factory=list)
    slice_index: int | None = None
    # 3D boxes: 1 propagates slice by slice along z (`propagate_slices`); 3 votes over the three planes (`vote_planes`)
    planes: int = 1


def segment(
    predictor: PromptPredictor,
    image: Image,
    prompts: Prompts,
    preset: str | None = None,
    on_slice: Callable[[int], None] | None = None,
) -> Image:
    """A label map (object ``i`` -> label ``i + 1``) on ``image``'s grid from the given prompts.

    2D images take boxes and/or clicks (clicks refine one object). Volumes take 3D boxes, or a 2D
    box and/or clicks on ``slice_index``; every object is propagated through the slices.

    Raises:
        MedsegError: prompts that do not fit the image (see `validate`).
    """
    if image.ndim == 2:
        return image.with_array(merge_objects(segment_logits(predictor, image, prompts, preset)), channels=1)
    per_slice = _volume_logits(predictor, image, prompts, preset, on_slice, None)
    return image.with_array(merge_slices(per_slice, tuple(image.array.shape[:3])), channels=1)


def segment_logits(
    predictor: PromptPredictor,
    image: Image,
    prompts: Prompts,
    preset: str | None = None,
    on_slice: Callable[[int], None] | None = None,
    key: Hashable | None = None,
) -> list[np.ndarray]:
    """Per-object logits ``(*spatial)`` float32 on ``image``'s grid (as `segment`, before merging).

    ``key`` names the image's pixels: its embeddings are then kept in the predictor's cache under ``key`` (2D)
    or ``(key, z)`` (slices of a volume) and reused by later calls with the same key (give the predictor a
    ``cache_size``).

    Raises:
        MedsegError: prompts that do not fit the image (see `validate`).
    """
    if image.ndim != 2:
        shape = tuple(image.array.shape[:3])
        return [full_logits(one, shape) for one in _volume_logits(predictor, image, prompts, preset, on_slice, key)]
    prompts = clip_to_image(image, prompts)[0]
    validate(image, prompts)
    shown = model_input(image, preset)
    _refuse_blank(constant_value(shown), image, preset)
    keyed = _KeyedPredictor(predictor, key) if key is not None else predictor
    return _segment_2d(keyed, shown, prompts)


def _refuse_blank(value: float | None, image: Image, preset: str | None) -> None:
    """Refuse an image that is not constant (validate) but whose normalised pixels are (``value``)."""
    if value is not None:
        element = "voxel" if image.ndim == 3 else "pixel"
        raise MedsegError(
            f"image is blank once normalised by the intensity preset {intensity_preset(image, preset).name} "
            f"(every {element} {value:g} of 255): there is nothing for a prompt to segment; choose another preset"
        )


def _volume_logits(
    predictor: PromptPredictor,
    image: Image,
    prompts: Prompts,
    preset: str | None,
    on_slice: Callable[[int], None] | None,
    key: Hashable | None,
) -> list[dict[int, np.ndarray]]:
    """Each object's logits by slice (`propagate_slices`); slices are normalised as they are reached."""
    prompts = clip_to_image(image, prompts)[0]
    validate(image, prompts)
    slices = ModelSlices(image, preset)
    _refuse_blank(slices.constant_value(), image, preset)
    keyed = _KeyedPredictor(predictor, key) if key is not None else predictor
    voting = prompts.boxes3d if prompts.planes == 3 else []  # validate has checked their voxels
    objects = [] if voting else [VolumePrompt.from_box3d(b) for b in prompts.boxes3d]
    z = prompts.slice_index if prompts.slice_index is not None else 0
    pts, lbl = tuple(prompts.points), tuple(prompts.point_labels)
    objects += [VolumePrompt(b, z, None, pts, lbl) for b in prompts.boxes]
    if prompts.points and not prompts.boxes:
        objects.append(VolumePrompt(None, z, None, pts, lbl))
    if key is None:
        predictor.clear_cache()  # slice keys of an earlier volume must not match this one's
        several = len(voting) + len(objects) > 1
        predictor.cache_size = (sum(slices.shape[:3]) if voting else slices.shape[0]) if several else 0
    voted = [vote_planes(keyed, slices, b, on_slice) for b in voting]  # type: ignore[arg-type]
    return voted + [propagate_slices(keyed, slices, obj, on_slice) for obj in objects]  # type: ignore[arg-type]


# Voxel sizes may differ by this factor at most for three-plane voting (the model sees rows and columns as images).
MAX_PLANE_ANISOTROPY = 2.0


def _check_isotropic(image: Image) -> None:
    if min(image.array.shape[:3]) < 2:  # a row or column slice would be a line
        shape = " x ".join(str(n) for n in reversed(image.array.shape[:3]))
        raise MedsegError(f"voting over three planes needs 2 voxels or more on each axis, not {shape}: use one plane")
    spacing = [float(v) for v in image.spacing[:3]]
    if max(spacing) > MAX_PLANE_ANISOTROPY * min(spacing):
        shown = " x ".join(f"{v:g}" for v in reversed(spacing))  # x, y, z as medseg info shows it
        raise MedsegError(
            f"voting over three planes needs voxels of similar size along the three axes, not {shown} mm "
            f"(x, y, z; at most {MAX_PLANE_ANISOTROPY:g}x apart): use one plane (--planes 1)"
        )


class _KeyedPredictor:
    """A `PromptPredictor` whose ``set_image(pixels, key=z)`` caches under ``(image key, z)`` (a volume's slice
    ``z``), and ``set_image(pixels)`` under the image key itself (a 2D image, or one slice given as its own)."""

    def __init__(self, predictor: PromptPredictor, key: Hashable) -> None:
        self._predictor, self._key = predictor, key

    def set_image(self, image: np.ndarray, key: object = None) -> None:
        self._predictor.set_image(image, key=self._key if key is None else (self._key, key))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._predictor, name)


def clip_to_image(image: Image, prompts: Prompts) -> tuple[Prompts, list[str]]:
    """``prompts`` with the boxes that cross the image's border clipped to it, and one note per clipped box.

    A box partly outside the image means the part inside (as a viewer's box dragged past the edge); a box wholly
    outside, inverted, empty or not finite is left as it is, for `validate` to refuse. A 3D box's slice range is
    clipped to the volume's slices the same way.
    """
    height, width = image.shape[-2:]
    depth = image.shape[0] if image.ndim == 3 else 1
    notes: list[str] = []

    def shown(box: Sequence[float]) -> str:
        return "(" + ", ".join(f"{float(v):g}" for v in box) + ")"

    boxes = []
    for box in prompts.boxes:
        clipped = _clip_box(box, width, height)
        if clipped != tuple(float(v) for v in box):
            notes.append(f"box {shown(box)} crosses the image's border: clipped to {shown(clipped)}")
        boxes.append(clipped)
    if image.ndim != 3:  # 3D boxes on a 2D image: validate refuses them
        return replace(prompts, boxes=boxes), notes
    boxes3d = []
    for box3 in prompts.boxes3d:
        x0, y0, z0, x1, y1, z1 = (float(v) for v in box3)
        cx0, cy0, cx1, cy1 = _clip_box((x0, y0, x1, y1), width, height)
        cz0, cz1 = _clip_span(z0, z1, depth - 1, inclusive=True) or (z0, z1)
        clipped3 = (cx0, cy0, cz0, cx1, cy1, cz1)
        if clipped3 != (x0, y0, z0, x1, y1, z1):
            notes.append(f"3D box {shown(box3)} crosses the volume's border: clipped to {shown(clipped3)}")
        boxes3d.append(clipped3)
    return replace(prompts, boxes=boxes, boxes3d=boxes3d), notes


def _clip_box(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    xs, ys = _clip_span(x0, x1, width), _clip_span(y0, y1, height)
    if xs is None or ys is None:
        return x0, y0, x1, y1  # wholly outside or not a box: validate refuses it
    return xs[0], ys[0], xs[1], ys[1]


def _clip_span(lo: float, hi: float, end: float, inclusive: bool = False) -> tuple[float, float] | None:
    """``(lo, hi)`` clipped to ``[0, end]`` (edges; ``inclusive``: indices up to ``end``), or None when it is not
    finite, inverted, empty or wholly outside."""
    inverted = lo > hi if inclusive else lo >= hi
    outside = (hi < 0 or lo > end) if inclusive else (hi <= 0 or lo >= end)
    if not np.isfinite([lo, hi]).all() or inverted or outside:
        return None
    return max(lo, 0.0), min(hi, float(end))


def validate(image: Image, prompts: Prompts) -> None:
    """Check prompts against the image before any model work.

    Raises:
        MedsegError: no prompt; a 3D box or --slice on a 2D image; a 2D box or clicks on a volume
            without a slice; clicks with several boxes; unsupported channels; NaN/inf intensities; a constant
            image (every voxel one value: nothing to segment).
    """
    if image.channels not in (1, 3):
        raise MedsegError(f"images with {image.channels} channels are not supported (grey or RGB only)")
    array = image.array
    if array.dtype.kind in "fc" and not all(np.isfinite(array[z]).all() for z in range(len(array))):
        raise MedsegError("image holds NaN/inf values")  # checked a slice (or row) at a time: no volume-sized mask
    if not (prompts.boxes or prompts.boxes3d or prompts.points):
        raise MedsegError("give a prompt: --box, --box3d or --point")
    if prompts.planes not in (1, 3):
        raise MedsegError(f"planes must be 1 or 3, not {prompts.planes!r}")
    if prompts.planes == 3 and prompts.boxes3d and image.ndim == 3:
        _check_isotropic(image)
    if prompts.points and len(prompts.boxes) + len(prompts.boxes3d) > 1:
        raise MedsegError("clicks refine one object: give at most one box with --point")
    if prompts.points and prompts.boxes3d:
        raise MedsegError("clicks go with a 2D --box on a --slice, not with --box3d")
    height, width = image.shape[-2:]
    for box in prompts.boxes:
        check_box(box, (height, width))
    for point in prompts.points:
        check_point(point, (height, width))
    if image.ndim == 2:
        if prompts.boxes3d:
            raise MedsegError("a 3D box was given for a 2D image; use --box x0,y0,x1,y1")
        if prompts.slice_index is not None:
            raise MedsegError("--slice is for volumes; this image is 2D")
        _refuse_constant(image)
        return
    depth = image.shape[0]
    if (prompts.boxes or prompts.points) and prompts.slice_index is None:
        raise MedsegError(f"a 2D box or clicks on a volume need --slice Z (0..{depth - 1}), or use --box3d")
    if prompts.slice_index is not None and not 0 <= prompts.slice_index < depth:
        raise MedsegError(f"--slice {prompts.slice_index} is outside the volume's {depth} slices (0..{depth - 1})")
    for box3 in prompts.boxes3d:
        x0, y0, z0, x1, y1, z1 = box3
        check_finite(box3, "3D box (" + ", ".join(f"{float(v):g}" for v in box3) + ")")
        if not (0 <= z0 <= z1 < depth):
            raise MedsegError(f"3D box {box3}: z must satisfy 0 <= z0 <= z1 < {depth}")
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise MedsegError(
                f"3D box {box3} lies outside the slices of width {width} and height {height} or is inverted"
            )
    _refuse_constant(image)


def _refuse_constant(image: Image) -> None:
    """A blank image (every voxel one value) gives a SAM-family model nothing to see: its mask would be drawn
    from the box alone, a confident answer about nothing. Refused (MedSAM would return that mask silently)."""
    value = constant_value(image.array)
    if value is not None:
        element = "voxel" if image.ndim == 3 else "pixel"
        raise MedsegError(
            f"image is constant (every {element} is {value:g}): there is nothing in it for a prompt to segment"
        )


def _segment_2d(predictor: Any, shown: np.ndarray, prompts: Prompts) -> list[np.ndarray]:
    predictor.set_image(shown)
    if prompts.points:
        box = list(prompts.boxes[0]) if prompts.boxes else None
        points = [list(p) for p in prompts.points]
        return [predictor.predict_with_clicks(box, points, list(prompts.point_labels)).logits[0]]  # clipped to box
    logits = predictor.predict(boxes=[list(b) for b in prompts.boxes]).logits
    return [clip_to_box(one, box) for one, box in zip(logits, prompts.boxes, strict=True)]
