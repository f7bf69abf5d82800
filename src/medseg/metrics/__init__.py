"""Segmentation metrics: DSC, NSD, HD95 (see `medseg.metrics.surface` for definitions)."""

from medseg.metrics.surface import (
    LabelScores,
    SurfaceDistances,
    dice,
    hd95_from_distances,
    image_diagonal_mm,
    nsd_from_distances,
    score_label_maps,
    score_masks,
    surface_distances,
)

__all__ = [
    "LabelScores",
    "SurfaceDistances",
    "dice",
    "hd95_from_distances",
    "image_diagonal_mm",
    "nsd_from_distances",
    "score_label_maps",
    "score_masks",
    "surface_distances",
]
