"""Episodes for in-context training: slice banks of labelled 2D frames and a seeded task sampler.

A *slice bank* holds one dataset's labelled 2D frames in the in-context model's frame (``size x size``,
grey, [0, 1] stored as uint8): 2D cases as they are, 3D volumes as slices along each of the three axes
that contain foreground. An *episode* (Butoi et al. 2023, UniverSeg, section 3.3) is a task, i.e. a
dataset and one of its labels (sometimes the union of two), a support set of N frames with that task's
binary masks, and a query frame with its mask. Task-level augmentation makes new tasks from old ones
(the same flip, rotation, intensity inversion and gamma for every frame of the episode), item-level
augmentation varies the frames within a task (zoom, shift, brightness, contrast, noise), and a share of
episodes are synthetic (random smooth blobs on random textures) so that the model learns to segment
rather than to recognise datasets.

Shapes: query ``(B, 1, S, S)``, support images and masks ``(B, N, 1, S, S)``, query mask ``(B, 1, S, S)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medseg.data.cases import load_case
from medseg.data.dataset import Case, open_dataset
from medseg.errors import MedsegError
from medseg.preprocessing.frames import model_frame


@dataclass
class SliceBank:
    """``images`` ``(M, S, S)`` uint8 (value / 255 is the [0, 1] frame) and ``labels`` ``(M, S, S)`` uint8."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    label_values: list[int]
    axes: np.ndarray  # (M,) the volume axis a frame was cut along; 0 for 2D cases
    by_task: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (axis, value) -> frame indices

    def __post_init__(self) -> None:
        if not self.by_task:
            present = [set(np.unique(label).tolist()) for label in self.labels]
            for axis in np.unique(self.axes).tolist():
                for v in self.label_values:
                    found = np.flatnonzero([v in p and a == axis for p, a in zip(present, self.axes, strict=True)])
                    if len(found):
                        self.by_task[(int(axis), v)] = found


def build_slice_bank(
    dataset_dir: str | Path,
    size: int = 128,
    slices_per_volume: int = 24,
    on_case: Callable[[Case], None] | None = None,
) -> SliceBank:
    """Read a labelled dataset into a `SliceBank` (3D: up to ``slices_per_volume`` foreground slices per
    volume, spread over the three axes).

    Raises:
        MedsegError: unreadable cases, or no labelled foreground at all.
    """
    dataset = open_dataset(dataset_dir)
    images, labels, axes = [], [], []
    for case in dataset.cases:
        if case.label is None:
            continue
        image, label = load_case(case)
        assert label is not None
        array = image.array if image.channels == 1 else image.array.astype(np.float32)
        planes = [(0, array, label)] if image.ndim == 2 else _foreground_slices(array, label, slices_per_volume)
        for axis, plane, truth in planes:
            images.append(np.round(model_frame(plane, size) * 255).astype(np.uint8))
            labels.append(_resize_label(truth, size))
            axes.append(axis)
        if on_case is not None:
            on_case(case)
    if not images:
        raise MedsegError("no labelled cases", dataset_dir)
    stacked = np.stack(labels)
    values = sorted(int(v) for v in np.unique(stacked) if v != 0)
    if not values:
        raise MedsegError("no foreground in any label map", dataset_dir)
    return SliceBank(dataset.name or Path(dataset_dir).name, np.stack(images), stacked, values, np.array(axes))


def save_bank(bank: SliceBank, path: Path) -> None:
    """Write a bank to ``.npz`` (a cache: reading a dataset once is the slow part)."""
    np.savez_compressed(
        path, images=bank.images, labels=bank.labels, values=np.array(bank.label_values), axes=bank.axes, name=bank.name
    )


def load_bank(path: Path) -> SliceBank:
    with np.load(path) as data:
        values = [int(v) for v in data["values"]]
        return SliceBank(str(data["name"]), data["images"], data["labels"], values, data["axes"])


def _foreground_slices(volume: np.ndarray, label: np.ndarray, count: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    planes = []
    for axis in range(3):
        present = np.flatnonzero(np.moveaxis(label, axis, 0).reshape(label.shape[axis], -1).any(axis=1))
        picked = (
            present[np.linspace(0, len(present) - 1, min(len(present), count // 3)).astype(int)] if len(present) else []
        )
        for index in picked:
            plane = np.take(volume, index, axis=axis)
            planes.append((axis, plane, np.take(label, index, axis=axis)))
    return planes


def _resize_label(label: np.ndarray, size: int) -> np.ndarray:
    tensor = torch.from_numpy(label.astype(np.float32))[None, None]
    return F.interpolate(tensor, (size, size), mode="nearest-exact")[0, 0].numpy().astype(np.uint8)


@dataclass
class EpisodeConfig:
    """Task sampling and augmentation; plain data (saved with the run)."""

    size: int = 128
    max_support: int = 16
    synthetic_probability: float = 0.1
    union_probability: float = 0.1
    inversion_probability: float = 0.2
    rotation_degrees: float = 20.0
    zoom_range: tuple[float, float] = (0.8, 1.2)
    noise_std: float = 0.03


class EpisodeSampler:
    """Draw batches of episodes from slice banks; every draw comes from the ``rng`` passed in."""

    def __init__(self, banks: list[SliceBank], config: EpisodeConfig) -> None:
        if not banks:
            raise MedsegError("in-context training needs at least one dataset")
        self.banks = banks
        self.config = config

    def batch(
        self, batch_size: int, support_size: int, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(query (B,1,S,S), support images (B,N,1,S,S), support masks (B,N,1,S,S), query mask (B,1,S,S))``."""
        images, masks = [], []
        for _ in range(batch_size):
            if rng.random() < self.config.synthetic_probability:
                frames, truth = _synthetic_task(support_size + 1, self.config.size, rng)
            else:
                frames, truth = self._real_task(support_size + 1, rng)
            frames, truth = self._augment(frames, truth, rng)
            images.append(frames)
            masks.append(truth)
        x, y = torch.stack(images), torch.stack(masks)  # (B, N+1, S, S)
        return x[:, :1], x[:, 1:, None], y[:, 1:, None], y[:, :1]

    def _real_task(self, count: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        bank = self.banks[int(rng.integers(len(self.banks)))]
        tasks = sorted(bank.by_task)
        axis, value = tasks[int(rng.integers(len(tasks)))]  # one axis per task: a task is one view
        chosen = [value]
        others = [v for a, v in tasks if a == axis and v != value]
        if others and rng.random() < self.config.union_probability:
            chosen.append(int(rng.choice(others)))
        pool = np.unique(np.concatenate([bank.by_task[(axis, v)] for v in chosen]))
        index = rng.choice(pool, count, replace=len(pool) < count)
        frames = torch.from_numpy(bank.images[index].astype(np.float32) / 255)
        truth = torch.from_numpy(np.isin(bank.labels[index], chosen).astype(np.float32))
        return frames, truth

    def _augment(
        self, frames: torch.Tensor, truth: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Task-level (same for all frames): flips, quarter turns, inversion, gamma; item-level: zoom,
        rotation and shift (one affine per frame), brightness, contrast, noise."""
        c = self.config
        if rng.random() < 0.5:
            frames, truth = frames.flip(-1), truth.flip(-1)
        if rng.random() < 0.5:
            frames, truth = frames.flip(-2), truth.flip(-2)
        turns = int(rng.integers(4))
        frames, truth = frames.rot90(turns, (-2, -1)), truth.rot90(turns, (-2, -1))
        if rng.random() < c.inversion_probability:
            frames = 1 - frames
        frames = frames.clamp(0, 1) ** float(np.exp(rng.uniform(-0.4, 0.4)))
        n = frames.shape[0]
        angle = np.deg2rad(rng.uniform(-c.rotation_degrees, c.rotation_degrees, n))
        zoom = rng.uniform(*c.zoom_range, n)
        shift = rng.uniform(-0.1, 0.1, (n, 2))
        theta = np.zeros((n, 2, 3), np.float32)
        theta[:, 0, 0], theta[:, 0, 1] = np.cos(angle) / zoom, -np.sin(angle) / zoom
        theta[:, 1, 0], theta[:, 1, 1] = np.sin(angle) / zoom, np.cos(angle) / zoom
        theta[:, :, 2] = shift
        grid = F.affine_grid(torch.from_numpy(theta), [n, 1, *frames.shape[-2:]], align_corners=False)
        frames = F.grid_sample(frames[:, None], grid, align_corners=False, padding_mode="border")[:, 0]
        truth = (F.grid_sample(truth[:, None], grid, align_corners=False, mode="nearest")[:, 0] > 0.5).float()
        scale = torch.from_numpy(rng.uniform(0.8, 1.2, (n, 1, 1)).astype(np.float32))
        offset = torch.from_numpy(rng.uniform(-0.1, 0.1, (n, 1, 1)).astype(np.float32))
        noise = torch.from_numpy(rng.normal(0, c.noise_std, frames.shape).astype(np.float32))
        return ((frames - 0.5) * scale + 0.5 + offset + noise).clamp(0, 1), truth


def _synthetic_task(count: int, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random smooth blobs (the task's structure) on a random texture; one intensity rule per task."""
    contrast = rng.uniform(0.15, 0.5) * rng.choice([-1, 1])
    smoothness = int(rng.choice([4, 8, 16]))
    threshold = rng.uniform(0.6, 0.85)

    def field(scale: int) -> torch.Tensor:
        coarse = torch.from_numpy(rng.random((count, 1, scale, scale)).astype(np.float32))
        return F.interpolate(coarse, (size, size), mode="bicubic", align_corners=False)[:, 0]

    shape_field = field(smoothness)
    low = shape_field.flatten(1).quantile(threshold, dim=1)[:, None, None]
    truth = (shape_field > low).float()
    texture = 0.5 + 0.25 * (field(int(rng.choice([16, 32, 64]))) - 0.5)
    frames = texture + contrast * truth + torch.from_numpy(rng.normal(0, 0.05, (count, size, size)).astype(np.float32))
    return frames.clamp(0, 1), truth
