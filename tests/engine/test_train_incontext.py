"""Episodic in-context training on tiny synthetic datasets: files, validation Dice, resume."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from dataset_builders import make_nnunet_2d_shapes, make_nnunet_3d
from medseg.data.episodes import EpisodeConfig
from medseg.engine.incontext import InContextTrainConfig, train_incontext
from medseg.errors import MedsegError


def test_training_writes_weights_and_resumes(tmp_path: Path) -> None:
    datasets = [str(make_nnunet_2d_shapes(tmp_path / "flat", cases=4)), str(make_nnunet_3d(tmp_path / "vol", cases=2))]
    config = InContextTrainConfig(
        datasets=datasets, encoder_blocks=[[4, 4]] * 3, batch_size=2, max_support=3, iterations_per_epoch=3,
        epochs=2, val_episodes=2, episodes=EpisodeConfig(size=32),
    )  # fmt: skip
    out = tmp_path / "run"
    record = train_incontext(config, out, cache_dir=tmp_path / "cache")
    assert record["epoch"] == 2 and 0 <= record["val_mean_dice"] <= 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["flat_32.npz", "vol_32.npz"]
    weights = torch.load(out / "weights.pt", weights_only=False)
    assert weights["architecture"]["encoder_blocks"] == [[4, 4]] * 3
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((out / "weights.pt").stat().st_mode) == 0o666 & ~umask  # like any new file, not 0600
    with pytest.raises(MedsegError, match="--resume"):
        train_incontext(config, out)
    config.epochs = 3
    train_incontext(config, out, cache_dir=tmp_path / "cache", resume=True)
    history = json.loads((out / "train.json").read_text())["history"]
    assert [r["epoch"] for r in history] == [1, 2, 3]
