"""Tiny models for the batch runner's tests (a planned supervised model and a UniverSeg, seeded untrained weights: no
training), the check that two output folders hold the same label maps, and a manifest's rows."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from cli_helpers import run_cli
from dataset_builders import make_nnunet_2d_shapes
from medseg.models.supervised import build_network
from medseg.planning import read_plan


def make_model(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """(images folder of 6 grey PNG cases, model folder): ``medseg plan`` and seeded untrained weights."""
    dataset = make_nnunet_2d_shapes(root / "Shapes", cases=6)
    assert run_cli("plan", dataset, "-o", root / "model").exit_code == 0
    torch.manual_seed(seed)
    network = build_network(read_plan(root / "model" / "plan.json").network)
    torch.save(network.state_dict(), root / "model" / "model.pt")
    return dataset / "imagesTr", root / "model"


def assert_same_label_maps(plain: Path, out: Path) -> None:
    """``out`` holds byte for byte the PNG label maps of ``plain`` and no unfinished (staging) folder."""
    expected = sorted(p.name for p in plain.glob("*.png"))
    assert sorted(p.name for p in out.glob("*.png")) == expected
    for name in expected:
        assert (out / name).read_bytes() == (plain / name).read_bytes(), name
    assert not list(out.glob(".medseg-staging.*"))


def make_universeg_weights(path: Path) -> Path:
    """Seeded untrained weights of a tiny UniverSeg (``--weights`` of ``medseg incontext``)."""
    from medseg.models.incontext import UniverSeg

    torch.manual_seed(0)
    model = UniverSeg([(4, 4)] * 3)
    torch.save({"architecture": {"encoder_blocks": [[4, 4]] * 3, "size": 32}, "state_dict": model.state_dict()}, path)
    return path


def manifest_rows(folder: Path) -> list[dict[str, str]]:
    """The rows of ``folder/manifest.csv``."""
    with open(folder / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))
