"""``plan.json``: how a dataset is resampled, normalised, cut into patches and learnt, derived from its
fingerprint by rules in the spirit of nnU-Net (Isensee et al. 2021, "nnU-Net: a self-configuring method
for deep learning-based biomedical image segmentation", Nature Methods 18), and editable by hand.

Rules:
- target spacing: the median spacing per axis; for anisotropic data (coarsest / finest median spacing
  > 3) the coarse axis takes the 10th percentile instead (nnU-Net);
- patch: the median shape after resampling, capped per profile (``cpu``: 256^2 in 2D, 96^3 in 3D),
  rounded up to a multiple of the network's total stride;
- network topology: an axis is down-sampled while it stays at least 4 voxels and its spacing is within 2x
  of the finest (anisotropic axes wait); 3x3(x3) kernels, 1 along axes still much coarser;
- batch size: as many patches as fit the memory budget, capped per profile (``cpu``: at most 8 in 2D and 4 in 3D, and
  no more voxels than 8 patches of 256^2 or 2 of 96^3);
  the patch shrinks if even one does not fit;
- normalisation: CT clipped to the foreground's 0.5-99.5 percentiles (nnU-Net) as a window; MR z-score;
  RGB to [0, 1]; other modalities percentile 0.5-99.5 to [0, 1];
- mirroring (augmentation and test-time): every axis except left-right when a label's name says left or
  right (``left``, ``right``, ``L``, ``R`` as words; mirroring would swap them).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError
from medseg.models.supervised import MODEL_NAMES, NetworkConfig
from medseg.planning.fingerprint import Fingerprint
from medseg.preprocessing.intensity import IntensityPreset, preset_for_modality

PLAN_VERSION = 1
MIN_FEATURE_SIZE = 4
PROFILES: dict[str, dict[str, Any]] = {
    # max patch voxels, max batch, base / max features, max down-sampling steps; pairs are (2D, 3D)
    "cpu": {"patch_voxels": (256**2, 96**3), "batch": (8, 4), "features": (16, 256), "depth": (6, 5)},
    "gpu": {"patch_voxels": (1024**2, 160**3), "batch": (32, 2), "features": (32, 320), "depth": (7, 5)},
}
_LATERAL = re.compile(r"(^|[^a-z])(left|right|l|r)([^a-z]|$)", re.IGNORECASE)  # "left lung", "kidney_L", "(R)"
# Bytes per feature-map voxel of one training step (activations kept for the backward pass, gradients,
# workspace), from the peak RSS of AdamW steps on 224x224 patches, batch 8, float32, CPU (torch 2.13).
_BYTES_PER_FEATURE_VOXEL = {"unet": 80.0, "vnet": 130.0, "transunet": 75.0}
_PROCESS_GB = 0.45  # python, torch and MONAI imported
# A LiteMedSAM U-Net's training step at 256 x 256 (benchmarks/litemedsam_memory.py): (fixed, per image) GB
# beyond the process, by whether the encoder is frozen; GenSeg's architecture step differentiates through one
# unrolled step (double back-propagation through the encoder). Scaled by the patch's pixels.
_LITEMEDSAM_STEP_GB = {True: (0.28, 0.18), False: (0.50, 2.57)}
_LITEMEDSAM_ARCHITECTURE_GB = {True: (0.30, 2.63), False: (0.28, 7.61)}


@dataclass
class TrainingConfig:
    """The ``training`` section of ``plan.json``."""

    batch_size: int = 2
    loss: str = "dice_ce"  # "dice_ce" or "dice" (V-Net's)
    optimizer: str = "adamw"  # "adamw" or "sgd" (nnU-Net: SGD, Nesterov, momentum 0.99)
    learning_rate: float = 1e-3
    weight_decay: float = 3e-5
    iterations_per_epoch: int = 50
    epochs: int = 100
    foreground_oversampling: float = 0.33  # share of patches centred on a foreground voxel
    val_cases_per_epoch: int = 16  # validation Dice each epoch on at most this many cases
    rotation_degrees: float = 15.0
    scale_range: list[float] = field(default_factory=lambda: [0.85, 1.25])
    elastic_probability: float = 0.1
    gamma_range: list[float] = field(default_factory=lambda: [0.7, 1.5])
    noise_probability: float = 0.15
    contrast_probability: float = 0.15

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        _only_known(cls, data, "training")
        config = cls(**data)
        if config.loss not in ("dice_ce", "dice"):
            raise MedsegError(f"training.loss must be 'dice_ce' or 'dice', got {config.loss!r}")
        if config.optimizer not in ("adamw", "sgd"):
            raise MedsegError(f"training.optimizer must be 'adamw' or 'sgd', got {config.optimizer!r}")
        for name in ("batch_size", "iterations_per_epoch", "epochs", "val_cases_per_epoch"):
            if not _is_int(getattr(config, name)) or getattr(config, name) < 1:
                raise MedsegError(f"training.{name} must be a positive integer")
        _number(config.learning_rate, "training.learning_rate", low=0.0, inclusive=False)
        _number(config.weight_decay, "training.weight_decay", low=0.0)
        _number(config.rotation_degrees, "training.rotation_degrees", low=0.0, high=180.0)
        for name in ("foreground_oversampling", "elastic_probability", "noise_probability", "contrast_probability"):
            _number(getattr(config, name), f"training.{name}", low=0.0, high=1.0)
        for name in ("scale_range", "gamma_range"):
            value = getattr(config, name)
            if not isinstance(value, list) or len(value) != 2:
                raise MedsegError(f"training.{name} must be [low, high], got {value!r}")
            for v in value:
                _number(v, f"training.{name}", low=0.0, inclusive=False)
            if value[0] > value[1]:
                raise MedsegError(f"training.{name} must be [low, high] with low <= high, got {value}")
        return config


@dataclass
class Plan:
    """Everything training and inference need besides the data; see the module docstring for the rules.

    Spacings and shapes are in numpy order ``(z, y, x)`` / ``(y, x)``, spacings in mm.
    """

    dataset_name: str
    modality: str
    spatial_dims: int
    channels: int
    labels: dict[str, int]  # {name: value}, background included
    target_spacing: list[float]
    median_shape: list[int]
    patch_size: list[int]
    intensity: dict[str, Any]  # an IntensityPreset
    mirror_axes: list[int]  # spatial array axes
    network: NetworkConfig
    training: TrainingConfig
    profile: str = "cpu"
    memory_budget_gb: float = 8.0
    estimated_memory_gb: float = 0.0
    version: int = PLAN_VERSION

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["network"] = self.network.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: Path | None = None) -> Plan:
        """Inverse of `to_dict`, with every field checked.

        Raises:
            MedsegError: unknown or missing keys, wrong types or inconsistent shapes (naming ``where``).
        """
        try:
            _only_known(cls, data, "plan")
            values = dict(data)
            values["network"] = NetworkConfig.from_dict(data["network"])
            values["training"] = TrainingConfig.from_dict(data["training"])
            plan = cls(**values)
            IntensityPreset.from_dict(plan.intensity)
            _check_consistent(plan)
        except MedsegError as error:
            raise MedsegError(error.problem, where) from None
        except (KeyError, TypeError) as error:
            raise MedsegError(f"plan is incomplete or mistyped: {error}", where) from None
        return plan

    def label_values(self) -> list[int]:
        return sorted(int(v) for v in self.labels.values())

    def intensity_preset(self) -> IntensityPreset:
        return IntensityPreset.from_dict(self.intensity)


def make_plan(
    fingerprint: Fingerprint, model: str = "unet", memory_gb: float | None = None, profile: str | None = None
) -> Plan:
    """Derive a plan from ``fingerprint`` for ``model`` (see the module docstring for the rules).

    Args:
        memory_gb: memory budget for training; default half the machine's RAM (CPU) or 90% of the GPU's.
        profile: ``"cpu"`` or ``"gpu"``; default by whether CUDA is available.

    Raises:
        MedsegError: unknown model or profile, no labelled cases, TransUNet on 3D data, or a patch that
            does not fit ``memory_gb`` even at batch size 1.
    """
    if model not in MODEL_NAMES:
        raise MedsegError(f"unknown model {model!r} (known: {', '.join(MODEL_NAMES)})")
    if not fingerprint.shapes:
        raise MedsegError("no labelled cases to plan from")
    dims = fingerprint.spatial_dims
    if model == "transunet" and dims != 2:
        raise MedsegError("TransUNet is a 2D network (Chen et al. 2021); use --model unet or vnet for 3D data")
    profile = profile or _default_profile()
    if profile not in PROFILES:
        raise MedsegError(f"unknown profile {profile!r} (known: {', '.join(PROFILES)})")
    settings = PROFILES[profile]
    if memory_gb is not None and not (math.isfinite(memory_gb) and memory_gb > 0):
        raise MedsegError(f"--memory-gb must be a positive number, got {memory_gb}")
    budget = float(memory_gb) if memory_gb is not None else _default_memory_gb(profile)
    spacing = _target_spacing(np.array(fingerprint.spacings))
    shapes = np.array(fingerprint.shapes, dtype=float) * np.array(fingerprint.spacings) / spacing
    median_shape = [max(1, round(s)) for s in np.median(shapes, axis=0)]
    patch = _cap_patch(median_shape, settings["patch_voxels"][dims - 2])
    labels = fingerprint.labels or {"background": 0} | {f"label_{v}": v for v in fingerprint.label_values if v}
    base, top = settings["features"]
    if model == "vnet":
        base = min(base, 16)  # the paper's width; 5x5(x5) kernels cost more
    training = TrainingConfig(loss="dice" if model == "vnet" else "dice_ce")
    while True:
        # TransUNet's tokens sit at 1/16 (Chen et al. 2021): four halvings.
        max_depth = 4 if model == "transunet" else settings["depth"][dims - 2]
        strides, kernels, patch = _topology(patch, spacing, max_depth)
        network = NetworkConfig(
            name=model,
            spatial_dims=dims,
            in_channels=fingerprint.channels,
            out_channels=max(int(v) for v in labels.values()) + 1,
            strides=strides,
            kernel_sizes=kernels,
            base_features=base,
            max_features=top,
            deep_supervision=model == "unet",
            patch_size=patch if model == "transunet" else None,
        )
        per_sample = estimate_training_memory_gb(network, patch, 1)
        if per_sample <= budget or all(p <= 2 * MIN_FEATURE_SIZE for p in patch):
            break
        largest = int(np.argmax(patch))
        patch = [*patch[:largest], max(2 * MIN_FEATURE_SIZE, int(patch[largest] * 0.8)), *patch[largest + 1 :]]
    voxel_cap = (8 * 256**2, 2 * 96**3)[dims - 2] if profile == "cpu" else float("inf")
    batch = min(settings["batch"][dims - 2], math.floor(voxel_cap / float(np.prod(patch))))
    batch = max(1, min(batch, math.floor(budget / max(per_sample, 1e-9))))
    # nnU-Net: a batch should not cover more than 5% of the dataset's voxels.
    dataset_voxels = float(np.sum(np.prod(shapes, axis=1)))
    batch = max(1, min(batch, math.floor(0.05 * dataset_voxels / float(np.prod(patch))) or 1))
    training.batch_size = batch
    plan = Plan(
        dataset_name=fingerprint.dataset_name,
        modality=fingerprint.modality,
        spatial_dims=dims,
        channels=fingerprint.channels,
        labels={str(k): int(v) for k, v in labels.items()},
        target_spacing=[float(s) for s in spacing],
        median_shape=median_shape,
        patch_size=patch,
        intensity=_intensity(fingerprint).to_dict(),
        mirror_axes=_mirror_axes(fingerprint),
        network=network,
        training=training,
        profile=profile,
        memory_budget_gb=round(budget, 2),
    )
    plan.estimated_memory_gb = round(estimate_training_memory_gb(network, patch, batch), 3)
    check_plan_fits(plan)
    return plan


def estimate_training_memory_gb(network: NetworkConfig, patch: list[int], batch: int) -> float:
    """Rough peak memory of one training step in GB: activations kept for the backward pass (feature-map
    voxels summed over stages, both paths) plus parameters with gradients and two Adam moments; for a
    LiteMedSAM encoder (``network.backbone``), `litemedsam_step_gb`."""
    if network.backbone == "litemedsam":
        return litemedsam_step_gb(network, patch, batch)
    size = np.array(patch, dtype=float)
    feature_voxels = 0.0
    for stage, width in enumerate(network.features()):
        feature_voxels += width * float(np.prod(size))
        if stage < len(network.strides):
            size = size / np.array(network.strides[stage])
    activations = feature_voxels * batch * _BYTES_PER_FEATURE_VOXEL[network.name]
    kernel = 5 if network.name == "vnet" else 3
    widths = network.features()
    params = sum(4 * w * w * kernel**network.spatial_dims for w in widths)  # ~two convs per stage, both paths
    return (activations + 16 * params) / 1e9 + _PROCESS_GB


def litemedsam_step_gb(network: NetworkConfig, patch: list[int], images: int, architecture: bool = False) -> float:
    """Peak memory in GB of a LiteMedSAM U-Net's training step on ``images`` patches (``architecture``: GenSeg's
    architecture step, ``images`` real and generated ones): the measured figures at 256 x 256
    (`benchmarks/litemedsam_memory.py`, frozen or fine-tuned encoder) scaled by the patch's pixels."""
    fixed, per_image = (_LITEMEDSAM_ARCHITECTURE_GB if architecture else _LITEMEDSAM_STEP_GB)[network.freeze_encoder]
    return _PROCESS_GB + fixed + images * per_image * float(np.prod(patch)) / 256**2


def check_plan_fits(plan: Plan, budget_gb: float | None = None, images_per_sample: int = 1) -> None:
    """Raise MedsegError when the plan's training step is estimated to exceed the memory budget
    (``images_per_sample``: images a step trains on per batch entry, 2 when GenSeg adds generated ones)."""
    budget = plan.memory_budget_gb if budget_gb is None else budget_gb
    batch = plan.training.batch_size
    need = estimate_training_memory_gb(plan.network, plan.patch_size, batch * images_per_sample)
    if need > budget:
        raise MedsegError(
            f"plan needs about {need:.2f} GB to train (patch {plan.patch_size}, batch {batch}"
            f"{'' if images_per_sample == 1 else f' and {batch * (images_per_sample - 1)} generated images'}) "
            f"but the memory budget is {budget:.2f} GB: "
            + ("lower training.batch_size or patch_size" if batch > 1 else "lower patch_size")
            + ", or raise --memory-gb"
        )


def fit_batch_to_budget(plan: Plan, budget_gb: float | None = None, images_per_sample: int = 1) -> int:
    """Lower ``plan.training.batch_size`` (down to 1) until its step is estimated to fit the memory budget, as
    planning chooses a batch (for a network the plan was not made for: a pretrained encoder, GenSeg's doubled
    steps; ``plan.estimated_memory_gb`` follows); returns the batch size it had. `check_plan_fits` then refuses
    a batch of 1 that does not fit."""
    budget = plan.memory_budget_gb if budget_gb is None else budget_gb
    before = plan.training.batch_size
    while plan.training.batch_size > 1 and budget < estimate_training_memory_gb(
        plan.network, plan.patch_size, plan.training.batch_size * images_per_sample
    ):
        plan.training.batch_size -= 1
    images = plan.training.batch_size * images_per_sample
    plan.estimated_memory_gb = round(estimate_training_memory_gb(plan.network, plan.patch_size, images), 3)
    return before


def write_plan(plan: Plan, path: Path) -> Path:
    """Write ``plan.json`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; a plan is meant to be read and edited
    with os.fdopen(fd, "w") as f:
        json.dump(plan.to_dict(), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_plan(path: str | Path) -> Plan:
    """Read and check a ``plan.json`` (a file, or a folder holding one).

    Raises:
        MedsegError: missing file, invalid JSON, or an invalid plan (naming the file).
    """
    p = Path(path)
    if p.is_dir():
        p = p / "plan.json"
    if not p.is_file():
        raise MedsegError("no such plan file", p)
    try:
        data = json.loads(p.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MedsegError(f"plan is not valid JSON ({error})", p) from None
    if not isinstance(data, dict):
        raise MedsegError("plan must be a JSON object", p)
    return Plan.from_dict(data, p)


def _default_profile() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def _default_memory_gb(profile: str) -> float:
    if profile == "gpu":
        import torch

        return 0.9 * torch.cuda.get_device_properties(0).total_memory / 1e9
    return 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def _target_spacing(spacings: np.ndarray) -> np.ndarray:
    target = np.median(spacings, axis=0)
    coarse = int(np.argmax(target))
    if target[coarse] > 3 * np.min(target):
        target[coarse] = np.percentile(spacings[:, coarse], 10)
    return target


def _cap_patch(shape: list[int], max_voxels: int) -> list[int]:
    patch = np.array(shape, dtype=float)
    while np.prod(patch) > max_voxels:
        patch[int(np.argmax(patch))] *= 0.9
    return [max(1, int(p)) for p in patch]


def _topology(
    patch: list[int], spacing: np.ndarray, max_depth: int
) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Strides and kernel sizes per stage, and the patch rounded up to a multiple of the total stride."""
    size = np.array(patch, dtype=float)
    current = np.array(spacing, dtype=float)
    strides: list[list[int]] = []
    kernels: list[list[int]] = []
    while True:
        finest = current.min()
        kernels.append([3 if s <= 2 * finest else 1 for s in current])
        step = [2 if size[a] / 2 >= MIN_FEATURE_SIZE and current[a] <= 2 * finest else 1 for a in range(len(size))]
        if len(strides) == max_depth or max(step) == 1:
            break
        strides.append(step)
        size = size / np.array(step)
        current = current * np.array(step)
    if not strides:  # tiny images: one step anyway, padding makes room for it
        strides.append([2] * len(patch))
        kernels.append([3] * len(patch))
    divisor = np.prod(np.array(strides), axis=0)
    rounded = [int(math.ceil(p / d) * d) for p, d in zip(patch, divisor, strict=True)]
    return strides, kernels, rounded


def _intensity(fingerprint: Fingerprint) -> IntensityPreset:
    if fingerprint.modality.strip().upper() == "CT" and fingerprint.foreground_intensity:
        stats = fingerprint.foreground_intensity[0]
        low, high = stats["percentile_00_5"], stats["percentile_99_5"]
        if high > low:
            return IntensityPreset("ct", level=(low + high) / 2, width=high - low)
    return preset_for_modality(fingerprint.modality, fingerprint.channels)


def _mirror_axes(fingerprint: Fingerprint) -> list[int]:
    axes = list(range(fingerprint.spatial_dims))
    if not any(_LATERAL.search(name.replace("_", " ")) for name in fingerprint.labels):
        return axes
    dims = fingerprint.spatial_dims
    direction = np.array(fingerprint.direction or np.eye(dims).ravel()).reshape(dims, dims)
    itk_axis = int(np.argmax(np.abs(direction[0])))  # the image axis that runs most along patient x (left-right)
    lateral = dims - 1 - itk_axis  # ITK axis order is reversed numpy order
    return [a for a in axes if a != lateral]


def _only_known(cls: type, data: Any, section: str) -> None:
    if not isinstance(data, dict):
        raise MedsegError(f"{section} must be a JSON object")
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise MedsegError(f"{section} has unknown keys {unknown} (allowed: {sorted(allowed)})")


def _is_positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any, name: str, low: float | None = None, high: float | None = None, inclusive: bool = True) -> None:
    """Raise MedsegError unless ``value`` is a finite number in the range."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value >= low if inclusive else value > low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        where = f" in {'[' if inclusive else '('}{low}, {high}]" if low is not None else ""
        raise MedsegError(f"{name} must be a finite number{where}, got {value!r}")


def _check_consistent(plan: Plan) -> None:
    from medseg.models.supervised.factory import check_config

    dims = plan.spatial_dims
    if dims not in (2, 3) or not _is_int(plan.channels) or plan.channels < 1:
        raise MedsegError("spatial_dims must be 2 or 3 and channels a positive integer")
    if (
        not all(isinstance(k, str) and _is_int(v) and v >= 0 for k, v in plan.labels.items())
        or 0 not in plan.labels.values()
    ):
        raise MedsegError(f"labels must map names to non-negative integers, background 0 included, got {plan.labels}")
    check_config(plan.network)
    if not isinstance(plan.network.deep_supervision, bool):
        raise MedsegError("network.deep_supervision must be true or false")
    if not isinstance(plan.network.freeze_encoder, bool):
        raise MedsegError("network.freeze_encoder must be true or false")
    for name in ("base_features", "max_features", "vit_layers", "vit_heads"):
        if not _is_int(getattr(plan.network, name)) or getattr(plan.network, name) < 1:
            raise MedsegError(f"network.{name} must be a positive integer")
    if not all(_is_int(v) for v in plan.patch_size if isinstance(plan.patch_size, list)):
        raise MedsegError(f"patch_size must list integers, got {plan.patch_size}")
    for name in ("target_spacing", "patch_size", "median_shape"):
        value = getattr(plan, name)
        if not isinstance(value, list) or len(value) != dims or not all(_is_positive(v) for v in value):
            raise MedsegError(f"{name} must list {dims} positive numbers, got {value}")
    if plan.network.spatial_dims != dims or plan.network.in_channels != plan.channels:
        raise MedsegError("network.spatial_dims / in_channels disagree with the plan's spatial_dims / channels")
    if plan.network.out_channels != max(plan.label_values()) + 1:
        raise MedsegError("network.out_channels must be the largest label value + 1")
    divisor = np.prod(np.array(plan.network.strides), axis=0)
    if any(p % d for p, d in zip(plan.patch_size, divisor, strict=True)):
        raise MedsegError(f"patch_size {plan.patch_size} must be divisible by the total stride {divisor.tolist()}")
    if plan.network.backbone == "litemedsam" and any(p % 4 for p in plan.patch_size):
        raise MedsegError(f"patch_size {plan.patch_size}: LiteMedSAM's encoder needs sides that are multiples of 4")
    if any(a not in range(dims) for a in plan.mirror_axes):
        raise MedsegError(f"mirror_axes must be spatial axes 0..{dims - 1}")
    if len(set(plan.mirror_axes)) != len(plan.mirror_axes):
        raise MedsegError(f"mirror_axes {plan.mirror_axes} names an axis twice")
