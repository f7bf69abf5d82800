"""Small synthetic datasets on disk, in the nnU-Net raw layout and as images/ + masks/ folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medseg.io import Geometry, Image, save

GEOMETRY_3D = Geometry((0.8, 0.8, 2.5), (-10.0, 20.0, 5.0), (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))


def label_volume(shape: tuple[int, int, int] = (6, 12, 10), seed: int = 0) -> np.ndarray:
    """Two blocky labels (1 and 2) in a (z, y, x) volume."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    z0 = int(rng.integers(1, 2))
    label[z0 : z0 + 3, 2:6, 2:5] = 1
    label[z0 : z0 + 3, 6:10, 5:8] = 2
    return label


def image_for(label: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (100.0 * label + rng.normal(0, 5, label.shape)).astype(np.float32)


def make_nnunet_3d(
    root: Path, cases: int = 3, ending: str = ".nii.gz", shape: tuple[int, int, int] = (6, 12, 10)
) -> Path:
    """A 3D dataset with labels {background: 0, a: 1, b: 2} and one channel."""
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(cases):
        label = label_volume(shape, seed=i)
        save(Image(image_for(label, i), GEOMETRY_3D), root / "imagesTr" / f"case_{i:03d}_0000{ending}")
        save(Image(label, GEOMETRY_3D), root / "labelsTr" / f"case_{i:03d}{ending}")
    write_dataset_json(root, cases, ending, {"0": "CT"}, {"background": 0, "a": 1, "b": 2}, "CT")
    return root


def make_nnunet_rgb_2d(root: Path, cases: int = 2) -> Path:
    """A 2D RGB dataset: one RGB PNG per case declared as three channels (as nnU-Net reads them)."""
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(cases):
        label = np.zeros((20, 24), np.uint8)
        label[5:12, 6 + i : 14 + i] = 1
        rgb = np.stack([label * 200 + 20, label * 50 + 30, np.full_like(label, 90)], axis=-1).astype(np.uint8)
        save(Image(rgb, channels=3), root / "imagesTr" / f"img{i}_0000.png")
        save(Image(label), root / "labelsTr" / f"img{i}.png")
    write_dataset_json(root, cases, ".png", {"0": "R", "1": "G", "2": "B"}, {"background": 0, "polyp": 1}, "endoscopy")
    return root


def make_folder_pairs(root: Path, cases: int = 2, mask_suffix: str = "_mask") -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(cases):
        label = np.zeros((16, 16), np.uint8)
        label[4:10, 3 + i : 9 + i] = 1
        save(Image((label * 150 + 40).astype(np.uint8)), root / "images" / f"s{i}.png")
        save(Image(label), root / "masks" / f"s{i}{mask_suffix}.png")
    return root


def write_dataset_json(
    root: Path, cases: int, ending: str, channels: dict[str, str], labels: dict[str, int], modality: str
) -> None:
    info = {
        "name": root.name,
        "channel_names": channels,
        "labels": labels,
        "numTraining": cases,
        "file_ending": ending,
        "modality": modality,
    }
    (root / "dataset.json").write_text(json.dumps(info, indent=2))


def make_nnunet_2d_shapes(root: Path, cases: int = 6, shape: tuple[int, int] = (32, 40), seed: int = 0) -> Path:
    """A grey 2D PNG dataset: a bright disc (label 1) and a dark bar (label 2) at random places."""
    rng = np.random.default_rng(seed)
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for i in range(cases):
        label = np.zeros(shape, np.uint8)
        cy, cx, r = rng.integers(8, shape[0] - 8), rng.integers(8, shape[1] - 8), rng.integers(4, 7)
        label[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
        top = int(rng.integers(1, shape[0] - 5))
        label[top : top + 3, 2:10] = 2
        image = 100 + 80 * (label == 1) - 60 * (label == 2) + rng.normal(0, 8, shape)
        save(Image(np.clip(image, 0, 255).astype(np.uint8)), root / "imagesTr" / f"case_{i:03d}_0000.png")
        save(Image(label), root / "labelsTr" / f"case_{i:03d}.png")
    write_dataset_json(root, cases, ".png", {"0": "grey"}, {"background": 0, "disc": 1, "bar": 2}, "microscopy")
    return root
