"""Overlap and surface metrics for binary masks: DSC, NSD and HD95, spacing-aware in 2D and 3D.

Surfaces follow MONAI (`monai.metrics.utils.get_edge_surface_distance`): the surface of a mask is
its voxels that a binary erosion removes; distances are Euclidean in mm between voxel centres
(``spacing_mm`` per array axis). The edges and both directed distance sets are computed once and
shared by NSD and HD95 (as in DeepMind's ``surface-distance``).

Definitions (per label, ``P`` = prediction, ``G`` = ground truth, ``dPG`` = distances from each
surface voxel of P to the surface of G, ``dGP`` likewise):

- DSC  = 2 |P & G| / (|P| + |G|)                      (Dice 1945; Sorensen 1948)
- NSD  = (#{dPG <= tau} + #{dGP <= tau}) / (#dPG + #dGP) (Nikolov et al. 2021, voxel-count form)
- HD95 = max(p95(dPG), p95(dGP)) in mm                 (95th percentile, linear interpolation)

Empty masks (the same convention as the BraTS challenge):

- both empty: DSC = 1, NSD = 1, HD95 = 0 (nothing to find, nothing found);
- exactly one empty: DSC = 0, NSD = 0, HD95 = the image diagonal in mm (the largest distance
  possible on this grid), so that an empty prediction is scored as the worst case, not skipped.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SurfaceDistances:
    """Directed distances in mm: ``pred_to_gt`` (one per surface voxel of P) and ``gt_to_pred``."""

    pred_to_gt: np.ndarray
    gt_to_pred: np.ndarray


@dataclass(frozen=True)
class LabelScores:
    """Scores of one label in one case."""

    dice: float
    nsd: float
    hd95_mm: float


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice similarity coefficient of two boolean masks of the same shape (1.0 when both are empty)."""
    _check_pair(pred, gt)
    p, g = pred.astype(bool), gt.astype(bool)
    total = int(p.sum()) + int(g.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, g).sum()) / total


def surface_distances(pred: np.ndarray, gt: np.ndarray, spacing_mm: Sequence[float]) -> SurfaceDistances:
    """Directed surface distances between two non-empty boolean masks.

    Args:
        pred, gt: boolean masks, shape ``(y, x)`` or ``(z, y, x)``.
        spacing_mm: voxel size per array axis, same order as the array axes.

    Raises:
        ValueError: shapes differ, spacing has the wrong length, or a mask is empty.
    """
    _check_pair(pred, gt)
    if len(spacing_mm) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing_mm)} does not match a {pred.ndim}D mask")
    if not pred.any() or not gt.any():
        raise ValueError("surface distances need two non-empty masks")
    import torch
    from monai.metrics.utils import get_edge_surface_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, distances, _ = get_edge_surface_distance(
            torch.from_numpy(np.ascontiguousarray(pred, dtype=bool)),
            torch.from_numpy(np.ascontiguousarray(gt, dtype=bool)),
            distance_metric="euclidean",
            spacing=[float(s) for s in spacing_mm],
            symmetric=True,
        )
    pred_to_gt, gt_to_pred = (d.double().cpu().numpy() for d in distances)
    return SurfaceDistances(pred_to_gt=pred_to_gt, gt_to_pred=gt_to_pred)


def hd95_from_distances(distances: SurfaceDistances) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm."""
    return float(max(np.percentile(distances.pred_to_gt, 95), np.percentile(distances.gt_to_pred, 95)))


def nsd_from_distances(distances: SurfaceDistances, tolerance_mm: float) -> float:
    """Normalised surface Dice: fraction of both surfaces within ``tolerance_mm`` of the other."""
    within = int((distances.pred_to_gt <= tolerance_mm).sum()) + int((distances.gt_to_pred <= tolerance_mm).sum())
    return within / (distances.pred_to_gt.size + distances.gt_to_pred.size)


def image_diagonal_mm(shape: Sequence[int], spacing_mm: Sequence[float]) -> float:
    """Length in mm of the grid's diagonal: the HD95 given when exactly one mask is empty."""
    return math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing_mm, strict=True)))


def score_masks(
    pred: np.ndarray, gt: np.ndarray, spacing_mm: Sequence[float], tolerance_mm: float = 2.0
) -> LabelScores:
    """DSC, NSD at ``tolerance_mm`` and HD95 (mm) of one binary prediction against its ground truth.

    Empty masks follow the module's convention (both empty: 1, 1, 0; one empty: 0, 0, diagonal).
    """
    if tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be >= 0, got {tolerance_mm}")
    p, g = pred.astype(bool), gt.astype(bool)
    dsc = dice(p, g)
    p_any, g_any = bool(p.any()), bool(g.any())
    if not p_any and not g_any:
        return LabelScores(dice=1.0, nsd=1.0, hd95_mm=0.0)
    if p_any != g_any:
        return LabelScores(dice=0.0, nsd=0.0, hd95_mm=image_diagonal_mm(p.shape, spacing_mm))
    distances = surface_distances(p, g, spacing_mm)
    return LabelScores(dsc, nsd_from_distances(distances, tolerance_mm), hd95_from_distances(distances))


def score_label_maps(
    pred: np.ndarray,
    gt: np.ndarray,
    labels: Sequence[int],
    spacing_mm: Sequence[float],
    tolerance_mm: float = 2.0,
) -> dict[int, LabelScores]:
    """`score_masks` for each label value of two integer label maps of the same shape."""
    _check_pair(pred, gt)
    return {int(v): score_masks(pred == v, gt == v, spacing_mm, tolerance_mm) for v in labels}


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
