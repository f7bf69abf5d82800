"""Slice banks and the episode sampler: frames per view, one view per task, seeded draws, binary masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dataset_builders import make_nnunet_2d_shapes, make_nnunet_3d
from medseg.data.episodes import EpisodeConfig, EpisodeSampler, build_slice_bank, load_bank, save_bank


def test_banks_of_2d_and_3d_datasets_round_trip(tmp_path: Path) -> None:
    flat = build_slice_bank(make_nnunet_2d_shapes(tmp_path / "flat", cases=4), size=32)
    assert flat.images.shape == (4, 32, 32) and flat.images.dtype == np.uint8
    assert flat.label_values == [1, 2] and set(flat.axes.tolist()) == {0}
    volume = build_slice_bank(make_nnunet_3d(tmp_path / "vol", cases=2), size=32, slices_per_volume=9)
    assert set(volume.axes.tolist()) == {0, 1, 2}  # slices cut along every axis
    assert all(volume.labels[i].any() for i in range(len(volume.labels)))  # foreground slices only
    save_bank(volume, tmp_path / "bank.npz")
    again = load_bank(tmp_path / "bank.npz")
    assert np.array_equal(again.images, volume.images) and again.by_task.keys() == volume.by_task.keys()


def test_episodes_are_seeded_binary_and_shaped(tmp_path: Path) -> None:
    bank = build_slice_bank(make_nnunet_2d_shapes(tmp_path / "flat", cases=6), size=32)
    sampler = EpisodeSampler([bank], EpisodeConfig(size=32, synthetic_probability=0.5))
    a = sampler.batch(3, 4, np.random.default_rng(1))
    b = sampler.batch(3, 4, np.random.default_rng(1))
    query, images, masks, truth = a
    assert query.shape == (3, 1, 32, 32) and images.shape == masks.shape == (3, 4, 1, 32, 32)
    assert truth.shape == (3, 1, 32, 32)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert set(torch.unique(torch.cat([masks.flatten(), truth.flatten()])).tolist()) <= {0.0, 1.0}
    assert float(query.min()) >= 0 and float(query.max()) <= 1
