"""Preprocessing: intensity normalisation, resampling to a spacing, and 2D resize-and-pad, each invertible.

torch is imported only when `resize_and_pad` / `undo_resize_and_pad` first run.
"""

from medseg.preprocessing.intensity import (
    CT_WINDOWS,
    IntensityPreset,
    check_preset_fits,
    ct_window,
    ct_window_by_name,
    intensity_map,
    mr_normalize,
    normalize,
    preset_for_modality,
    rgb_to_unit,
)
from medseg.preprocessing.resample import ResampleRecord, invert_resample, resample_to_spacing
from medseg.preprocessing.resize import ResizeRecord, resize_and_pad, undo_resize_and_pad

__all__ = [
    "CT_WINDOWS",
    "IntensityPreset",
    "ResampleRecord",
    "ResizeRecord",
    "check_preset_fits",
    "ct_window",
    "ct_window_by_name",
    "intensity_map",
    "invert_resample",
    "mr_normalize",
    "normalize",
    "preset_for_modality",
    "resample_to_spacing",
    "resize_and_pad",
    "rgb_to_unit",
    "undo_resize_and_pad",
]
