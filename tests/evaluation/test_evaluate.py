"""Pairing, scoring and reports of `medseg.evaluation`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from dataset_builders import GEOMETRY_3D
from medseg.errors import MedsegError
from medseg.evaluation import evaluate_pairs, pair_cases, write_report
from medseg.io import Geometry, Image, save


def _write_pair_folders(tmp_path: Path) -> tuple[Path, Path]:
    """Two 2D cases: 'a' with a one-column shift of label 1, 'b' perfect; spacing rows 1 mm, cols 2 mm."""
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    geometry = Geometry((2.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    gt = np.zeros((10, 10), np.uint8)
    gt[2:6, 2:6] = 1
    shifted = np.roll(gt, 1, axis=1)
    for name, p, g in (("a", shifted, gt), ("b", gt, gt)):
        save(Image(p, geometry), pred_dir / f"{name}.nii.gz")
        save(Image(g, geometry), gt_dir / f"{name}.nii.gz")
    return pred_dir, gt_dir


def test_scores_match_hand_computation(tmp_path: Path) -> None:
    pred_dir, gt_dir = _write_pair_folders(tmp_path)
    ev = evaluate_pairs(pair_cases(pred_dir, gt_dir), {1: "square"}, {0, 1}, tolerance_mm=1.0)
    by_case = {r.case: r for r in ev.rows}
    assert by_case["a"].dice == pytest.approx(0.75)
    assert by_case["a"].nsd == pytest.approx(16 / 24)  # see tests/metrics/test_surface.py
    assert by_case["a"].hd95_mm == pytest.approx(2.0)
    assert (by_case["b"].dice, by_case["b"].hd95_mm) == (1.0, 0.0)
    summary = ev.summary()
    stats = summary["labels"]["1"]["dice"]  # type: ignore[index]
    assert stats == {
        "mean": pytest.approx(0.875),
        "median": pytest.approx(0.875),
        "std": pytest.approx(0.125),
        "count": 2,
    }


def test_labels_found_when_none_declared_and_absent_labels_score_perfect(tmp_path: Path) -> None:
    pred_dir, gt_dir = tmp_path / "p", tmp_path / "g"
    one = np.zeros((6, 6), np.uint8)
    one[1:3, 1:3] = 1
    two = np.zeros((6, 6), np.uint8)
    two[3:5, 3:5] = 2
    save(Image(one), pred_dir / "x.png")
    save(Image(one), gt_dir / "x.png")
    save(Image(two), pred_dir / "y.png")
    save(Image(two), gt_dir / "y.png")
    ev = evaluate_pairs(pair_cases(pred_dir, gt_dir))
    assert ev.labels == {1: "label_1", 2: "label_2"}
    assert [(r.case, r.label, r.dice) for r in ev.rows] == [("x", 1, 1.0), ("x", 2, 1.0), ("y", 1, 1.0), ("y", 2, 1.0)]


def test_3d_spacing_is_used(tmp_path: Path) -> None:
    gt = np.zeros((8, 8, 8), np.uint8)
    gt[2:5, 2:5, 2:5] = 1
    save(Image(np.roll(gt, 1, axis=0), GEOMETRY_3D), tmp_path / "p.nii.gz")
    save(Image(gt, GEOMETRY_3D), tmp_path / "g.nii.gz")
    ev = evaluate_pairs(pair_cases(tmp_path / "p.nii.gz", tmp_path / "g.nii.gz"), {1: "cube"})
    assert ev.rows[0].hd95_mm == pytest.approx(2.5)  # one slice of 2.5 mm


def test_missing_partner_and_mixed_inputs(tmp_path: Path) -> None:
    pred_dir, gt_dir = _write_pair_folders(tmp_path)
    (pred_dir / "b.nii.gz").unlink()
    with pytest.raises(MedsegError, match="no prediction for case 'b'") as info:
        pair_cases(pred_dir, gt_dir)
    assert str(info.value).startswith(str(gt_dir / "b.nii.gz"))
    save(Image(np.zeros((3, 3), np.uint8)), pred_dir / "c.png")
    save(Image(np.zeros((3, 3), np.uint8)), pred_dir / "b.png")
    with pytest.raises(MedsegError, match="no ground truth for case 'c'"):
        pair_cases(pred_dir, gt_dir)
    with pytest.raises(MedsegError, match="both be files or both be folders"):
        pair_cases(pred_dir, gt_dir / "a.nii.gz")
    with pytest.raises(MedsegError, match="no such file"):
        pair_cases(tmp_path / "nope", gt_dir)


def test_geometry_shape_and_label_errors_name_the_prediction(tmp_path: Path) -> None:
    gt = np.zeros((6, 6), np.uint8)
    gt[1:3, 1:3] = 1
    save(Image(gt), tmp_path / "g.nii.gz")
    moved = Geometry((1.0, 1.0), (5.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    save(Image(gt, moved), tmp_path / "p.nii.gz")
    with pytest.raises(MedsegError, match=r"geometry differs.*origin") as info:
        evaluate_pairs(pair_cases(tmp_path / "p.nii.gz", tmp_path / "g.nii.gz"))
    assert str(info.value).startswith(str(tmp_path / "p.nii.gz"))
    save(Image(np.zeros((6, 7), np.uint8)), tmp_path / "p2.nii.gz")
    with pytest.raises(MedsegError, match="shape"):
        evaluate_pairs(pair_cases(tmp_path / "p2.nii.gz", tmp_path / "g.nii.gz"))
    save(Image(gt * 5), tmp_path / "p3.nii.gz")
    with pytest.raises(MedsegError, match=r"\[5\] are not in the dataset's labels"):
        evaluate_pairs(pair_cases(tmp_path / "p3.nii.gz", tmp_path / "g.nii.gz"), declared={0, 1})
    nan = gt.astype(np.float32)
    nan[0, 0] = np.nan
    save(Image(nan), tmp_path / "p4.nii.gz")
    with pytest.raises(MedsegError, match="NaN"):
        evaluate_pairs(pair_cases(tmp_path / "p4.nii.gz", tmp_path / "g.nii.gz"))


def test_report_files(tmp_path: Path) -> None:
    pred_dir, gt_dir = _write_pair_folders(tmp_path)
    ev = evaluate_pairs(pair_cases(pred_dir, gt_dir), {1: "square"})
    written = write_report(ev, tmp_path / "out")
    assert [p.name for p in written] == ["metrics.csv", "summary.json", "evaluation.png"]
    with open(tmp_path / "out" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["case", "label", "label_name", "dice", "nsd", "hd95_mm"]
    assert [(r["case"], r["label_name"]) for r in rows] == [("a", "square"), ("b", "square")]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["cases"] == 2 and summary["labels"]["1"]["dice"]["count"] == 2
    assert (tmp_path / "out" / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_failure_leaves_no_partial_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pred_dir, gt_dir = _write_pair_folders(tmp_path)
    ev = evaluate_pairs(pair_cases(pred_dir, gt_dir), {1: "square"})

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("medseg.evaluation.figure.draw_figure", broken)
    with pytest.raises(MedsegError, match="disk full"):
        write_report(ev, tmp_path / "new" / "deeper" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gt", "pred"]  # nor the parents made for it


def test_npz_pairs_score_segs_against_gts(tmp_path: Path) -> None:
    gt = np.zeros((8, 8), np.uint8)
    gt[2:5, 2:5] = 1
    pred = np.roll(gt, 1, axis=1)
    image = np.arange(64, dtype=np.uint8).reshape(8, 8)
    with open(tmp_path / "CASE.NPZ", "wb") as f:  # np.savez would append .npz to the upper-case name
        np.savez(f, imgs=image, gts=gt, segs=pred, spacing=np.array([1.0, 1.0]))
    ev = evaluate_pairs(pair_cases(tmp_path / "CASE.NPZ", tmp_path / "CASE.NPZ"), {1: "x"})
    assert ev.rows[0].dice == pytest.approx(2 * 6 / 18)
    np.savez(tmp_path / "two.npz", imgs=image, other=gt)
    with pytest.raises(MedsegError, match="no 'segs'"):
        evaluate_pairs(pair_cases(tmp_path / "two.npz", tmp_path / "CASE.NPZ"))


def test_tolerance_must_be_finite(tmp_path: Path) -> None:
    pred_dir, gt_dir = _write_pair_folders(tmp_path)
    with pytest.raises(MedsegError, match="finite"):
        evaluate_pairs(pair_cases(pred_dir, gt_dir), tolerance_mm=float("inf"))
