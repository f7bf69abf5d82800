"""DSC, NSD and HD95 on geometry worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg.metrics import dice, image_diagonal_mm, score_label_maps, score_masks, surface_distances


def _square_pair() -> tuple[np.ndarray, np.ndarray]:
    """A 4x4 ground-truth square and the same square shifted one column to the right."""
    gt = np.zeros((10, 10), bool)
    gt[2:6, 2:6] = True
    pred = np.zeros_like(gt)
    pred[2:6, 3:7] = True
    return pred, gt


def test_dice_of_shifted_square_is_overlap_fraction() -> None:
    pred, gt = _square_pair()
    assert dice(pred, gt) == pytest.approx(2 * 12 / 32)


def test_surface_distances_with_anisotropic_spacing() -> None:
    # Rows 1 mm apart, columns 2 mm apart. Each 12-voxel ring: 6 voxels on the other ring (0 mm),
    # 2 voxels one row from it (1 mm), 4 voxels one column from it (2 mm).
    pred, gt = _square_pair()
    d = surface_distances(pred, gt, (1.0, 2.0))
    expected = [0.0] * 6 + [1.0] * 2 + [2.0] * 4
    assert sorted(d.pred_to_gt.tolist()) == expected
    assert sorted(d.gt_to_pred.tolist()) == expected


def test_nsd_and_hd95_of_shifted_square() -> None:
    pred, gt = _square_pair()
    tight = score_masks(pred, gt, (1.0, 2.0), tolerance_mm=1.0)
    assert tight.nsd == pytest.approx(16 / 24)
    assert tight.hd95_mm == pytest.approx(2.0)
    loose = score_masks(pred, gt, (1.0, 2.0), tolerance_mm=2.0)
    assert loose.nsd == pytest.approx(1.0)
    # Columns 0.5 mm apart: the 2 left-column voxels are now nearer a column (0.5 mm) than a row (2 mm),
    # so each ring has 6 voxels at 0 mm and 6 at 0.5 mm.
    swapped = score_masks(pred, gt, (2.0, 0.5), tolerance_mm=0.4)
    assert swapped.nsd == pytest.approx(12 / 24)
    assert swapped.hd95_mm == pytest.approx(0.5)


def test_cube_shifted_one_slice_with_anisotropic_spacing() -> None:
    gt = np.zeros((8, 8, 8), bool)
    gt[2:5, 2:5, 2:5] = True  # 3x3x3: 26 surface voxels, the centre is interior
    pred = np.roll(gt, 1, axis=0)  # one slice up, slices 3 mm apart
    s = score_masks(pred, gt, (3.0, 1.0, 1.0), tolerance_mm=1.0)
    assert s.dice == pytest.approx(2 * 18 / 54)
    d = surface_distances(pred, gt, (3.0, 1.0, 1.0))
    # Pred slices 3,4 lie on gt surface voxels (0 mm) except the centre of slice 4, which is the gt
    # interior voxel: 1 mm to its in-plane neighbours. Slice 5 (9 voxels) is 3 mm above gt slice 4.
    assert sorted(d.pred_to_gt.tolist()) == [0.0] * 16 + [1.0] + [3.0] * 9
    assert s.hd95_mm == pytest.approx(3.0)
    assert s.nsd == pytest.approx(2 * 17 / 52)


def test_identical_masks_are_perfect() -> None:
    _, gt = _square_pair()
    s = score_masks(gt, gt, (0.7, 0.7))
    assert (s.dice, s.nsd, s.hd95_mm) == (1.0, 1.0, 0.0)


def test_both_empty_is_perfect() -> None:
    empty = np.zeros((5, 6), bool)
    s = score_masks(empty, empty, (1.0, 1.0))
    assert (s.dice, s.nsd, s.hd95_mm) == (1.0, 1.0, 0.0)


@pytest.mark.parametrize("which", ["pred", "gt"])
def test_one_empty_scores_worst_with_diagonal_hd95(which: str) -> None:
    _, mask = _square_pair()
    empty = np.zeros_like(mask)
    pred, gt = (empty, mask) if which == "pred" else (mask, empty)
    s = score_masks(pred, gt, (1.0, 2.0))
    assert (s.dice, s.nsd) == (0.0, 0.0)
    assert s.hd95_mm == pytest.approx(math.hypot(10 * 1.0, 10 * 2.0))
    assert image_diagonal_mm((10, 10), (1.0, 2.0)) == pytest.approx(s.hd95_mm)


def test_2d_slice_equals_3d_result_for_a_one_slice_volume() -> None:
    pred, gt = _square_pair()
    flat = score_masks(pred, gt, (1.0, 2.0), 1.0)
    # A single slice in 3D has no interior along z: every voxel is surface, so compare Dice only,
    # and surfaces of a thick (two identical slices) extrusion far apart in z.
    vol = score_masks(pred[None], gt[None], (5.0, 1.0, 2.0), 1.0)
    assert vol.dice == pytest.approx(flat.dice)


def test_label_maps_score_each_label() -> None:
    gt = np.zeros((6, 6), np.uint8)
    gt[:3] = 1
    gt[3:] = 2
    pred = gt.copy()
    pred[2] = 2  # one row of label 1 predicted as 2
    scores = score_label_maps(pred, gt, [1, 2, 3], (1.0, 1.0))
    assert scores[1].dice == pytest.approx(2 * 12 / (12 + 18))
    assert scores[2].dice == pytest.approx(2 * 18 / (24 + 18))
    assert scores[3].dice == 1.0  # absent from both


def test_shape_mismatch_and_bad_arguments() -> None:
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((3, 3)), np.zeros((3, 4)))
    pred, gt = _square_pair()
    with pytest.raises(ValueError, match="spacing"):
        surface_distances(pred, gt, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="tolerance"):
        score_masks(pred, gt, (1.0, 1.0), tolerance_mm=-1)
