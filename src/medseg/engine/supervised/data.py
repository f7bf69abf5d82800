"""Cases prepared as a plan says (normalised, resampled, channels first) and seeded random training patches
with nnU-Net-style augmentation: rotation and scaling, elastic deformation, mirroring, gamma, noise and
contrast (Isensee et al. 2021, supplementary: each applied with a probability, per patch)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medseg.data.cases import load_case
from medseg.data.dataset import Case
from medseg.io import Image
from medseg.planning import Plan
from medseg.preprocessing import network_input
from medseg.preprocessing.resample import ResampleRecord, resample_to_spacing

FOREGROUND_POINTS = 4000  # foreground voxels remembered per label and case, for foreground-centred patches
SPATIAL_PROBABILITY = 0.2  # nnU-Net: rotation and scaling each with p = 0.2


@dataclass
class PreparedCase:
    """``image`` ``(C, *spatial)`` float32 and ``label`` ``(*spatial)`` uint8 on the plan's grid."""

    name: str
    image: np.ndarray
    label: np.ndarray
    foreground: dict[int, np.ndarray]  # label value -> (N, ndim) voxel indices


def prepare_image(image: Image, plan: Plan) -> tuple[np.ndarray, ResampleRecord | None]:
    """Normalise and resample an image to the plan's grid; returns ``(C, *spatial)`` float32 and the record
    for `medseg.preprocessing.resample.invert_resample` (None when the spacing already matched)."""
    return network_input.prepare_image(image, plan.intensity_preset(), plan.target_spacing)


def prepare_case(case: Case, plan: Plan, seed: int = 0) -> PreparedCase:
    """Load one labelled case and bring image and label to the plan's grid (label: nearest neighbour)."""
    image, label = load_case(case)
    assert label is not None
    array, record = prepare_image(image, plan)
    if record is not None:
        label = resample_to_spacing(image.with_array(label), plan.target_spacing, is_label=True)[0].array
    rng = np.random.default_rng(seed)
    foreground = {}
    for value in plan.label_values():
        if value == 0:
            continue
        points = np.argwhere(label == value)
        if len(points) > FOREGROUND_POINTS:
            points = points[rng.choice(len(points), FOREGROUND_POINTS, replace=False)]
        if len(points):
            foreground[value] = points.astype(np.int32)
    return PreparedCase(case.name, array, label.astype(np.uint8), foreground)


class PatchSampler:
    """Draws augmented training batches from prepared cases; every draw comes from ``rng``.

    A patch is centred on a random foreground voxel (of a random present label) with probability
    ``training.foreground_oversampling``, otherwise anywhere such that it overlaps the image. A region
    larger than the patch is cut first so that rotation and scaling do not bring in empty corners.
    """

    def __init__(self, cases: list[PreparedCase], plan: Plan) -> None:
        self.cases = cases
        self.plan = plan
        self.patch = np.array(plan.patch_size)

    def batch(self, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images (B, C, *patch) float32, labels (B, 1, *patch) int64)``."""
        images, labels = [], []
        for _ in range(size):
            case = self.cases[int(rng.integers(len(self.cases)))]
            image, label = self._sample(case, rng)
            images.append(image)
            labels.append(label)
        return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels)[:, None].astype(np.int64))

    def _sample(self, case: PreparedCase, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        training = self.plan.training
        spatial = np.array(case.label.shape)
        if case.foreground and rng.random() < training.foreground_oversampling:
            points = case.foreground[list(case.foreground)[int(rng.integers(len(case.foreground)))]]
            centre = points[int(rng.integers(len(points)))]
        else:
            low = np.minimum(self.patch // 2, spatial // 2)
            high = np.maximum(spatial - self.patch // 2, spatial // 2 + 1)
            centre = np.array([rng.integers(lo, hi) for lo, hi in zip(low, high, strict=True)])
        spatial_aug = rng.random(2) < SPATIAL_PROBABILITY
        region = (self.patch * (1.5 if spatial_aug.any() else 1.0)).astype(int)
        image, label = crop(case.image, case.label, centre, region)
        if spatial_aug.any():
            image, label = self._affine(image, label, spatial_aug, rng)
        if rng.random() < training.elastic_probability:
            image, label = self._elastic(image, label, rng)
        for axis in self.plan.mirror_axes:
            if rng.random() < 0.5:
                image, label = np.flip(image, axis + 1), np.flip(label, axis)
        return self._intensity(np.ascontiguousarray(image), rng), np.ascontiguousarray(label)

    def _affine(
        self, image: np.ndarray, label: np.ndarray, which: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        from monai.transforms import Affine

        dims = self.plan.spatial_dims
        limit = np.deg2rad(self.plan.training.rotation_degrees)
        angles = rng.uniform(-limit, limit, 1 if dims == 2 else 3) if which[0] else np.zeros(1 if dims == 2 else 3)
        low, high = self.plan.training.scale_range
        scale = rng.uniform(low, high) if which[1] else 1.0
        affine = Affine(
            rotate_params=angles.tolist(),
            scale_params=[scale] * dims,
            spatial_size=self.plan.patch_size,
            padding_mode="zeros",
            image_only=True,
        )
        out_image = affine(torch.from_numpy(np.ascontiguousarray(image)), mode="bilinear")
        out_label = affine(torch.from_numpy(np.ascontiguousarray(label[None].astype(np.float32))), mode="nearest")
        return np.asarray(out_image, dtype=np.float32), np.asarray(out_label[0]).astype(np.uint8)

    def _elastic(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        from monai.transforms import Rand2DElasticd, Rand3DElasticd

        patch = self.plan.patch_size
        elastic: Rand2DElasticd | Rand3DElasticd
        if self.plan.spatial_dims == 2:
            elastic = Rand2DElasticd(
                ["image", "label"],
                spacing=(max(patch) // 4,) * 2,
                magnitude_range=(1, 3),
                prob=1.0,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            )
        else:
            elastic = Rand3DElasticd(
                ["image", "label"],
                sigma_range=(5, 8),
                magnitude_range=(50, 150),
                prob=1.0,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            )
        elastic.set_random_state(seed=int(rng.integers(2**31)))
        out = elastic({"image": torch.from_numpy(image), "label": torch.from_numpy(label[None].astype(np.float32))})
        return np.asarray(out["image"], dtype=np.float32), np.asarray(out["label"][0]).astype(np.uint8)

    def _intensity(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        training = self.plan.training
        if rng.random() < training.noise_probability:
            image = image + rng.normal(0, rng.uniform(0, 0.1) * (image.std() + 1e-6), image.shape).astype(np.float32)
        if rng.random() < training.contrast_probability:
            mean = image.mean(axis=tuple(range(1, image.ndim)), keepdims=True)
            image = (image - mean) * np.float32(rng.uniform(0.75, 1.25)) + mean
        if rng.random() < 0.3:  # gamma on the patch's range (nnU-Net, p = 0.3)
            low, high = image.min(), image.max()
            span = max(float(high - low), 1e-6)
            gamma = rng.uniform(training.gamma_range[0], training.gamma_range[1])
            image = (((image - low) / span) ** gamma * span + low).astype(np.float32)
        return image


def crop(image: np.ndarray, label: np.ndarray, centre: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ``size`` region around ``centre``, zero-padded where it leaves the image."""
    start = centre - size // 2
    image_out = np.zeros((image.shape[0], *size), np.float32)
    label_out = np.zeros(tuple(size), np.uint8)
    src, dst = [], []
    for s, n, length in zip(start, label.shape, size, strict=True):
        lo, hi = max(s, 0), min(s + length, n)
        hi = max(hi, lo)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    image_out[(slice(None), *dst)] = image[(slice(None), *src)]
    label_out[tuple(dst)] = label[tuple(src)]
    return image_out, label_out
