"""Prompts on a medical image -> a label map on the image's grid (what ``medseg prompt`` runs)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from medseg.errors import MedsegError
from medseg.inference.prompt_predictor import PromptPredictor, check_box, check_finite, check_point, clip_to_box
from medseg.inference.propagation import VolumePrompt, merge_objects, propagate
from medseg.io import Image
from medseg.preprocessing import IntensityPreset, normalize
from medseg.preprocessing.intensity import holds_no_hounsfield_units
from medseg.preprocessing.statistics import constant_value

# Images whose values span at least this range from at most -500 are taken to be CT in HU.
_HU_MIN, _HU_MAX = -500.0, 300.0


@dataclass
class Prompts:
    """What the user gave, in voxel/pixel indices of the input (x = column, y = row, z = slice)."""

    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    boxes3d: list[tuple[float, float, float, float, float, float]] = field(default_factory=list)
    points: list[tuple[float, float]] = field(default_factory=list)
    point_labels: list[int] = field(default_factory=list)
    slice_index: int | None = None


def intensity_preset(image: Image, preset: str | None) -> IntensityPreset:
    """The preset to display-normalise ``image`` for prompting, as LiteMedSAM's training images were made.

    ``preset`` names one (``ct:soft_tissue``, ``ct:lung``, ``ct:brain``, ``ct:bone``, ``mr``,
    ``percentile``, ``rgb``, ``none``); None picks by the rule of MedSAM's preprocessing scripts:

    - RGB -> ``rgb``; a 2D grey image of integers (8- or 16-bit) -> ``none``: the model's own min-max
      scaling (``pre_grey_rgb.py`` min-max scales such images to 8 bits);
    - CT (DICOM Modality CT, or values from below -500 to above 300, Hounsfield units) -> ``ct:soft_tissue``
      (``pre_CT_MR.py`` windows CT); never 8-bit pixels, which hold no Hounsfield units;
    - anything else (MR and other volumes, float images) -> ``mr``: clipped at the 0.5 / 99.5 percentiles of
      the non-zero voxels and scaled to [0, 1], so a zero background stays 0 (``pre_CT_MR.py``'s non-CT
      branch); all voxels count when none is above zero.
    """
    if preset is not None:
        return IntensityPreset(preset, mode="unit") if preset in ("mr", "percentile") else IntensityPreset(preset)
    if image.channels == 3:
        return IntensityPreset("rgb")
    array = image.array
    is_ct = not holds_no_hounsfield_units(image) and (  # an 8-bit "CT" is a screenshot: no HU to window
        str(image.meta.get("modality", "")).upper() == "CT"
        or (array.dtype.kind in "if" and float(array.min()) <= _HU_MIN and float(array.max()) >= _HU_MAX)
    )
    if is_ct:
        return IntensityPreset("ct:soft_tissue")
    if image.ndim == 2 and array.dtype.kind in "iub":  # 2D display images: min-max scaled by the model
        return IntensityPreset("none")
    return IntensityPreset("mr", mode="unit")


def model_input(image: Image, preset: str | None = None) -> np.ndarray:
    """``image``'s pixels as LiteMedSAM's training images were stored: 8-bit levels (float32, 0..255).

    `intensity_preset` chooses the normalisation; its [0, 1] output is scaled to 0..255 and truncated to whole
    levels (``np.uint8`` of MedSAM's ``pre_CT_MR.py``); with ``none``, values already in 0..255 are truncated
    as they are, others min-max scaled to 0..255 first (``pre_grey_rgb.py``). Shape as ``image.array``.

    Raises:
        MedsegError: an unknown preset; a CT window on 8-bit pixels (`check_preset_fits`).
    """
    chosen = intensity_preset(image, preset)
    shown = normalize(image, chosen).array.astype(np.float64)
    if chosen.name == "none":
        low, high = (float(shown.min()), float(shown.max())) if shown.size else (0.0, 0.0)
        if low < 0 or high > 255:
            shown = (shown - low) / max(high - low, 1e-12) * 255.0
    else:
        shown = np.clip(shown, 0.0, 1.0) * 255.0
    return np.floor(shown + 1e-6).astype(np.float32)  # the epsilon keeps k/255 * 255 at k despite rounding


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
    return image.with_array(merge_objects(segment_logits(predictor, image, prompts, preset, on_slice)), channels=1)


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
    prompts = clip_to_image(image, prompts)[0]
    validate(image, prompts)
    shown = model_input(image, preset)
    blank = constant_value(shown)
    if blank is not None:  # the image is not constant (validate), but its normalised pixels are
        element = "voxel" if image.ndim == 3 else "pixel"
        raise MedsegError(
            f"image is blank once normalised by the intensity preset {intensity_preset(image, preset).name} "
            f"(every {element} {blank:g} of 255): there is nothing for a prompt to segment; choose another preset"
        )
    keyed = _KeyedPredictor(predictor, key) if key is not None else predictor
    if image.ndim == 2:
        return _segment_2d(keyed, shown, prompts)
    objects = [VolumePrompt.from_box3d(b) for b in prompts.boxes3d]
    z = prompts.slice_index if prompts.slice_index is not None else 0
    pts, lbl = tuple(prompts.points), tuple(prompts.point_labels)
    objects += [VolumePrompt(b, z, None, pts, lbl) for b in prompts.boxes]
    if prompts.points and not prompts.boxes:
        objects.append(VolumePrompt(None, z, None, pts, lbl))
    if key is None:
        predictor.clear_cache()  # slice keys of an earlier volume must not match this one's
        predictor.cache_size = shown.shape[0] if len(objects) > 1 else 0
    return [propagate(keyed, shown, obj, on_slice) for obj in objects]  # type: ignore[arg-type]


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
    if not np.isfinite(image.array).all():
        raise MedsegError("image holds NaN/inf values")
    if not (prompts.boxes or prompts.boxes3d or prompts.points):
        raise MedsegError("give a prompt: --box, --box3d or --point")
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
