"""An image as a network takes it: normalised with an intensity preset, resampled to a target spacing and
channels first. Training (`medseg.engine.supervised.data`) and inference (`SupervisedPredictor`) share it,
as nnU-Net's predictor reuses its preprocessor."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medseg.io.image import Image
from medseg.preprocessing.intensity import IntensityPreset, normalize
from medseg.preprocessing.resample import ResampleRecord, resample_to_spacing


def prepare_image(
    image: Image, preset: IntensityPreset, target_spacing: Sequence[float]
) -> tuple[np.ndarray, ResampleRecord | None]:
    """Normalise ``image`` with ``preset`` and resample it to ``target_spacing``; returns ``(C, *spatial)``
    float32 and the record for `medseg.preprocessing.resample.invert_resample` (None when the spacing
    already matched, within a relative 1e-3)."""
    shown = normalize(image, preset)
    record = None
    if not np.allclose(shown.spacing, target_spacing, rtol=1e-3):
        shown, record = resample_to_spacing(shown, target_spacing)
    array = shown.array.astype(np.float32)
    array = np.moveaxis(array, -1, 0) if shown.channels > 1 else array[None]
    return np.ascontiguousarray(array), record
