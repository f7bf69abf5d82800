"""A dataset fingerprint: what planning needs to know about the data (nnU-Net's "dataset fingerprint",
Isensee et al. 2021): per-case spacing and shape, channels, the orientation of the first case, and
intensity statistics of the foreground (voxels with a non-zero label)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from medseg.data.cases import load_case
from medseg.data.dataset import Case, Dataset

FOREGROUND_SAMPLES_PER_CASE = 10_000


@dataclass
class Fingerprint:
    """Shapes in numpy order ``(z, y, x)`` / ``(y, x)``; spacings in mm, same order."""

    dataset_name: str
    modality: str
    spatial_dims: int
    channels: int
    labels: dict[str, int]
    shapes: list[list[int]]
    spacings: list[list[float]]
    direction: list[float]  # of the first case, ITK order (row-major 2x2 / 3x3)
    foreground_intensity: list[dict[str, float]] = field(default_factory=list)  # per channel
    case_names: list[str] = field(default_factory=list)
    label_values: list[int] = field(default_factory=list)  # every value seen in a label map

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fingerprint_dataset(dataset: Dataset, on_case: Callable[[Case], None] | None = None) -> Fingerprint:
    """Read every labelled case of ``dataset`` once and summarise it.

    Raises:
        MedsegError: unreadable cases (run ``medseg dataset check`` first for a full report).
    """
    rng = np.random.default_rng(0)
    shapes, spacings, samples = [], [], []
    direction: list[float] = []
    channels = 1
    spatial_dims = 2
    names = []
    seen: set[int] = set()
    for case in dataset.cases:
        if case.label is None:
            continue
        image, label = load_case(case)
        assert label is not None
        if not direction:
            direction = [float(v) for v in image.geometry.direction]
            channels, spatial_dims = image.channels, image.ndim
        shapes.append([int(s) for s in image.shape])
        spacings.append([float(s) for s in image.spacing])
        array = image.array.reshape(-1, image.channels) if image.channels > 1 else image.array.reshape(-1, 1)
        foreground = array[label.reshape(-1) > 0]
        if len(foreground) > FOREGROUND_SAMPLES_PER_CASE:
            foreground = foreground[rng.choice(len(foreground), FOREGROUND_SAMPLES_PER_CASE, replace=False)]
        samples.append(foreground.astype(np.float32))
        names.append(case.name)
        seen.update(int(v) for v in np.unique(label))
        if on_case is not None:
            on_case(case)
    pooled = np.concatenate(samples) if samples else np.zeros((0, channels), np.float32)
    stats = []
    for c in range(channels):
        values = pooled[:, c] if len(pooled) else np.zeros(1, np.float32)
        stats.append(
            {
                "mean": float(values.mean()),
                "std": float(values.std()),
                "percentile_00_5": float(np.percentile(values, 0.5)),
                "percentile_99_5": float(np.percentile(values, 99.5)),
            }
        )
    return Fingerprint(
        dataset_name=dataset.name or dataset.root.name,
        # nnU-Net v2 declares the modality per channel ("CT", "MRI", ...) where medseg reads "modality"
        modality=dataset.modality or next(iter(dataset.channel_names.values()), ""),
        spatial_dims=spatial_dims,
        channels=channels,
        labels=dict(dataset.labels),
        shapes=shapes,
        spacings=spacings,
        direction=direction,
        foreground_intensity=stats,
        case_names=names,
        label_values=sorted(seen),
    )
