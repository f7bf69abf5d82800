"""Planning from a fingerprint: spacing, topology, patch, batch, intensity, mirroring, and plan.json checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dataset_builders import make_nnunet_2d_shapes, make_nnunet_3d
from medseg.data import open_dataset
from medseg.errors import MedsegError
from medseg.planning import (
    Fingerprint,
    check_plan_fits,
    fingerprint_dataset,
    fit_batch_to_budget,
    litemedsam_step_gb,
    make_plan,
    read_plan,
    write_plan,
)
from medseg.planning.plan import estimate_training_memory_gb


def _fingerprint(spacings: list[list[float]], shapes: list[list[int]], **kw: object) -> Fingerprint:
    values: dict = {
        "dataset_name": "t",
        "modality": "MR",
        "spatial_dims": len(shapes[0]),
        "channels": 1,
        "labels": {"background": 0, "a": 1},
        "shapes": shapes,
        "spacings": spacings,
        "direction": list(np.eye(len(shapes[0])).ravel()),
        "foreground_intensity": [{"mean": 1.0, "std": 1.0, "percentile_00_5": -100.0, "percentile_99_5": 300.0}],
    }
    values.update(kw)
    return Fingerprint(**values)


def test_fingerprint_and_plan_of_a_3d_dataset(tmp_path: Path) -> None:
    fingerprint = fingerprint_dataset(open_dataset(make_nnunet_3d(tmp_path / "d", cases=3)))
    assert np.allclose(fingerprint.spacings, [[2.5, 0.8, 0.8]] * 3) and fingerprint.shapes == [[6, 12, 10]] * 3
    assert fingerprint.label_values == [0, 1, 2]
    plan = make_plan(fingerprint, "unet", memory_gb=4, profile="cpu")
    assert plan.target_spacing == pytest.approx([2.5, 0.8, 0.8])
    stride = np.prod(np.array(plan.network.strides), axis=0)
    assert all(p % s == 0 for p, s in zip(plan.patch_size, stride, strict=True))
    # z is ~3x coarser than y/x: it is not down-sampled first and its first kernel is 1 wide (nnU-Net).
    assert plan.network.strides[0][0] == 1 and plan.network.kernel_sizes[0][0] == 1
    assert plan.network.out_channels == 3 and plan.intensity["name"] == "ct"  # the builder declares CT
    assert plan.intensity["level"] is not None  # a window from the foreground percentiles


def test_anisotropic_target_spacing_uses_the_10th_percentile() -> None:
    spacings = [[5.0, 1.0, 1.0], [4.0, 1.0, 1.0], [6.0, 1.0, 1.0], [3.5, 1.0, 1.0]]
    plan = make_plan(_fingerprint(spacings, [[20, 64, 64]] * 4), memory_gb=4, profile="cpu")
    assert plan.target_spacing[0] == pytest.approx(np.percentile([5.0, 4.0, 6.0, 3.5], 10))
    assert plan.target_spacing[1:] == [1.0, 1.0]


def test_patch_is_capped_and_batch_follows_the_budget() -> None:
    fingerprint = _fingerprint([[1.0, 1.0]] * 50, [[1000, 800]] * 50, spatial_dims=2)
    big = make_plan(fingerprint, memory_gb=4, profile="cpu")
    assert np.prod(big.patch_size) <= 1.1 * 256**2
    small_budget = make_plan(fingerprint, memory_gb=0.8, profile="cpu")
    assert small_budget.training.batch_size < big.training.batch_size
    assert small_budget.estimated_memory_gb <= 0.8


def test_lateral_labels_are_not_mirrored_left_right() -> None:
    labels = {"background": 0, "right lung": 1, "left_lung": 2}
    plan = make_plan(_fingerprint([[1.0, 1.0]], [[64, 64]], spatial_dims=2, labels=labels), memory_gb=4, profile="cpu")
    assert plan.mirror_axes == [0]  # x (the last array axis) runs left-right
    short = {"background": 0, "kidney_L": 1, "kidney (R)": 2}
    assert make_plan(
        _fingerprint([[1.0, 1.0]], [[64, 64]], spatial_dims=2, labels=short), profile="cpu"
    ).mirror_axes == [0]
    plain = make_plan(_fingerprint([[1.0, 1.0]], [[64, 64]], spatial_dims=2), memory_gb=4, profile="cpu")
    assert plain.mirror_axes == [0, 1]


def test_plan_round_trips_and_bad_plans_are_named(tmp_path: Path) -> None:
    fingerprint = fingerprint_dataset(open_dataset(make_nnunet_2d_shapes(tmp_path / "d")))
    plan = make_plan(fingerprint, "transunet", memory_gb=4, profile="cpu")
    path = write_plan(plan, tmp_path / "p" / "plan.json")
    assert read_plan(path).to_dict() == plan.to_dict()
    data = json.loads(path.read_text())
    broken = {
        "bad.json": "{not json",
        "unknown.json": json.dumps({**data, "learning": 1}),
        "patch.json": json.dumps({**data, "patch_size": [33, 40]}),
        "loss.json": json.dumps({**data, "training": {**data["training"], "loss": "focal"}}),
        "preset.json": json.dumps({**data, "intensity": {"name": "ct:nowhere"}}),
        "mirror.json": json.dumps({**data, "mirror_axes": [1, 1]}),
    }
    for name, text in broken.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(MedsegError) as info:
            read_plan(tmp_path / name)
        assert info.value.path == tmp_path / name


def test_a_plan_that_does_not_fit_memory_is_refused(tmp_path: Path) -> None:
    fingerprint = fingerprint_dataset(open_dataset(make_nnunet_2d_shapes(tmp_path / "d")))
    plan = make_plan(fingerprint, memory_gb=4, profile="cpu")
    plan.training.batch_size = 100_000
    with pytest.raises(MedsegError, match="memory budget"):
        check_plan_fits(plan)


def test_a_litemedsam_unet_is_estimated_from_its_measured_step(tmp_path: Path) -> None:
    fingerprint = fingerprint_dataset(open_dataset(make_nnunet_2d_shapes(tmp_path / "d")))
    plan = make_plan(fingerprint, memory_gb=4, profile="cpu")
    plan.network.backbone, plan.patch_size = "litemedsam", [256, 256]
    frozen = litemedsam_step_gb(plan.network, [256, 256], 4)
    assert estimate_training_memory_gb(plan.network, [256, 256], 4) == frozen
    assert litemedsam_step_gb(plan.network, [128, 128], 4) < frozen < litemedsam_step_gb(plan.network, [256, 256], 8)
    plan.network.freeze_encoder = False
    tuned = litemedsam_step_gb(plan.network, [256, 256], 4)
    assert tuned > 2 * frozen
    assert litemedsam_step_gb(plan.network, [256, 256], 2, architecture=True) > litemedsam_step_gb(
        plan.network, [256, 256], 2
    )


def test_the_batch_is_lowered_to_fit_the_budget_and_a_batch_of_one_refused(tmp_path: Path) -> None:
    fingerprint = fingerprint_dataset(open_dataset(make_nnunet_2d_shapes(tmp_path / "d")))
    plan = make_plan(fingerprint, memory_gb=4, profile="cpu")
    plan.network.backbone, plan.network.freeze_encoder, plan.patch_size = "litemedsam", False, [256, 256]
    plan.training.batch_size = 8
    assert fit_batch_to_budget(plan, 12.0) == 8
    lowered = plan.training.batch_size
    assert 1 < lowered < 8
    assert estimate_training_memory_gb(plan.network, [256, 256], lowered) <= 12.0
    assert estimate_training_memory_gb(plan.network, [256, 256], lowered + 1) > 12.0
    assert plan.estimated_memory_gb == round(estimate_training_memory_gb(plan.network, [256, 256], lowered), 3)
    check_plan_fits(plan, 12.0)
    fit_batch_to_budget(plan, 12.0, images_per_sample=2)  # GenSeg: as many generated images again
    assert plan.training.batch_size == lowered // 2
    fit_batch_to_budget(plan, 1.0)
    assert plan.training.batch_size == 1
    with pytest.raises(MedsegError, match=r"memory budget is 1\.00 GB: lower patch_size, or raise --memory-gb"):
        check_plan_fits(plan, 1.0)
    with pytest.raises(MedsegError, match="and 1 generated images"):
        check_plan_fits(plan, 1.0, images_per_sample=2)


def test_transunet_refuses_3d_data(tmp_path: Path) -> None:
    fingerprint = fingerprint_dataset(open_dataset(make_nnunet_3d(tmp_path / "d")))
    with pytest.raises(MedsegError, match="2D network"):
        make_plan(fingerprint, "transunet", profile="cpu")
