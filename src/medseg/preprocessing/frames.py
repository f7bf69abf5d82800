"""The in-context model's frame: images as grey ``S x S`` float32 in [0, 1] and label maps as binary masks on
the same ``S x S`` grid (UniverSeg's input, ``S = 128`` for v1). Used by the in-context predictors and by the
episode sampler that trains them. torch is imported with this module (not from `medseg.preprocessing`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def model_frame(image: np.ndarray, size: int = 128) -> np.ndarray:
    """An image in the in-context model's frame: ``(H, W)`` or ``(H, W, C)`` (channels averaged) -> grey
    ``(size, size)`` float32 in [0, 1], clipped to its 0.5-99.5 percentiles (NaN -> the low value)."""
    tensor = torch.from_numpy(unit_range(image))[None, None]
    return F.interpolate(tensor, (size, size), mode="bilinear", antialias=True, align_corners=False)[0, 0].numpy()


def frame_side(side: int, low: int, high: int) -> int:
    """An encoder frame's side for images whose larger side is ``side`` pixels: rounded up to a multiple of 16,
    then clamped to ``[low, high]`` (a small image is not blown up; a large one is shrunk only so far)."""
    return int(min(high, max(low, -(-int(side) // 16) * 16)))


def unit_range(image: np.ndarray, keep_rgb: bool = False) -> np.ndarray:
    """``(H, W)`` or ``(H, W, C)`` -> float32 in [0, 1]: channels averaged (kept when ``keep_rgb`` and there
    are 3), clipped to the 0.5-99.5 percentiles of the finite values and scaled (NaN and +-inf -> the low value:
    no data reads as background, so a slice of them is not one bright object; all zeros when the range is
    empty). float64 is scaled before the cast to float32, so huge values stay finite."""
    array = image.astype(np.float64 if image.dtype == np.float64 else np.float32)
    if array.ndim == 3 and not (keep_rgb and array.shape[-1] == 3):
        array = array.mean(axis=-1)
    finite = np.isfinite(array)
    low, high = np.percentile(array[finite], (0.5, 99.5)) if finite.any() else (0.0, 1.0)
    array = np.clip(np.nan_to_num(array, nan=low, posinf=low, neginf=low), low, high)
    return ((array - low) / (high - low) if high > low else np.zeros_like(array)).astype(np.float32)


def label_masks(label: np.ndarray, values: Sequence[int], size: int = 128, mode: str = "bilinear") -> np.ndarray:
    """``(K, size, size)`` float32 binary masks of ``label == v`` for each of ``values``: resized by ``mode``
    (``"bilinear"``, or ``"area"``: the share of each new pixel the label covers), then >= 0.5."""
    binary = torch.from_numpy(np.stack([label == v for v in values]).astype(np.float32))[None]
    corners = {"align_corners": False} if mode == "bilinear" else {}
    return (F.interpolate(binary, (size, size), mode=mode, **corners)[0] >= 0.5).float().numpy()
