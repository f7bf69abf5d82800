"""Episodic training of the `MatchingHead` on frozen LiteMedSAM features (`train_matching_head`).

Every sampled image is embedded once (the frozen encoder is the slow part: about 1.5 s per image on two
CPU cores) into a frame bank, cached as ``bank.npz`` in the run folder. An episode draws a dataset, a label,
a query showing the label and 1 to ``max_support`` other images showing it; `matching_maps` turns it into
cues, and the head learns the query's mask from them (BCE + soft Dice, Adam, random flips of the episode).
Checkpoints every ``checkpoint_every`` steps; ``resume`` continues a run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medseg.data import open_dataset
from medseg.data.cases import load_case
from medseg.engine.run_files import atomic_write, write_json
from medseg.errors import MedsegError
from medseg.models.incontext.matching_head import MatchingHead

HEAD_FILE = "matching_head.pt"


@dataclass
class HeadTrainConfig:
    """Plain data, saved with the run."""

    datasets: list[str] = field(default_factory=list)
    images_per_dataset: int = 40
    steps: int = 800
    batch_size: int = 8
    max_support: int = 8
    learning_rate: float = 2e-3
    width: int = 24
    seed: int = 0
    checkpoint_every: int = 50


@dataclass
class _Bank:
    name: str
    frames: np.ndarray  # (M, C + 12, h, w) float16
    masks: np.ndarray  # (M, K, 2h, 2w) bool
    values: list[int]


def train_matching_head(
    config: HeadTrainConfig,
    output: Path,
    resume: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> Path:
    """Train and write ``output/matching_head.pt`` ({"width", "state_dict"}); returns its path.

    Raises:
        MedsegError: no datasets, a dataset without labelled foreground, or an output folder holding
            another run (without ``resume``).
    """
    from medseg.inference.feature_incontext import FeatureMatchingPredictor

    if not config.datasets:
        raise MedsegError("train-matching-head needs at least one dataset")
    for folder in config.datasets:  # every dataset opens and has labelled cases before anything is written
        if not [c for c in open_dataset(folder).cases if c.label is not None]:
            raise MedsegError("no labelled cases", folder)
    checkpoint = output / "checkpoint.pt"
    if checkpoint.exists() and not resume:
        raise MedsegError("already holds a run; pass --resume to continue it or choose another folder", output)
    predictor = FeatureMatchingPredictor.from_checkpoint(method="knn")
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    try:
        banks = _banks(config, predictor, output / "bank.npz")
    except MedsegError:
        if created and not any(output.iterdir()):
            output.rmdir()  # a failed start leaves nothing behind
        raise
    write_json(output / "config.json", asdict(config))
    torch.manual_seed(config.seed)
    head = MatchingHead(config.width)
    optimizer = torch.optim.Adam(head.parameters(), config.learning_rate)
    state: dict[str, Any] = {"step": 0, "losses": [], "seconds": 0.0}
    if resume and checkpoint.is_file():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        head.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
    head.train()
    while state["step"] < config.steps:
        started = time.perf_counter()
        rng = np.random.default_rng([config.seed, state["step"]])
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * (1 - state["step"] / config.steps) ** 0.9
        cues, images, targets = _batch(banks, config, predictor, rng)
        logits = head(cues, images)
        probabilities = torch.sigmoid(logits)
        overlap = (probabilities * targets).sum((1, 2, 3))
        dice = (2 * overlap + 1) / (probabilities.sum((1, 2, 3)) + targets.sum((1, 2, 3)) + 1)
        loss = F.binary_cross_entropy_with_logits(logits, targets) + (1 - dice).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state["step"] += 1
        state["losses"].append(round(float(loss.detach()), 4))
        state["seconds"] += time.perf_counter() - started
        if on_step is not None:
            on_step(state["step"], state["losses"][-1])
        if state["step"] % config.checkpoint_every == 0 or state["step"] == config.steps:
            _save_checkpoint(
                checkpoint, {"model": head.state_dict(), "optimizer": optimizer.state_dict(), "state": state}
            )
    weights = output / HEAD_FILE
    atomic_write(weights, lambda f: torch.save({"width": config.width, "state_dict": head.state_dict()}, f))
    write_json(
        output / "train.json",
        {"config": asdict(config), "steps": state["step"], "seconds": round(state["seconds"], 1),
         "loss_first_50": float(np.mean(state["losses"][:50])), "loss_last_50": float(np.mean(state["losses"][-50:]))},
    )  # fmt: skip
    return weights


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save(payload, f))


def _batch(
    banks: list[_Bank], config: HeadTrainConfig, predictor: Any, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cues ``(B, 3, 2h, 2w)``, query RGB frames ``(B, 3, 2h, 2w)`` and query masks ``(B, 1, 2h, 2w)``."""
    from medseg.inference.feature_incontext import matching_maps

    cues: list[torch.Tensor] = []
    images: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    while len(cues) < config.batch_size:
        bank = banks[int(rng.integers(len(banks)))]
        label = int(rng.integers(len(bank.values)))
        showing = np.flatnonzero(bank.masks[:, label].any(axis=(1, 2)))
        if len(showing) < 2:
            continue
        picked = rng.choice(showing, min(len(showing), 1 + int(rng.integers(1, config.max_support + 1))), replace=False)
        query = torch.from_numpy(bank.frames[picked[:1]].astype(np.float32))
        support = torch.from_numpy(bank.frames[picked[1:]].astype(np.float32))
        masks = torch.from_numpy(bank.masks[picked, label].astype(np.float32))
        with torch.no_grad():
            maps = matching_maps(query, support, masks[1:], predictor.k, predictor.temperature,
                                 predictor.max_locations, rng)  # fmt: skip
        image, target = F.pixel_shuffle(query[:, -12:], 2), masks[:1, None]
        if rng.random() < 0.5:
            maps, image, target = maps.flip(-1), image.flip(-1), target.flip(-1)
        if rng.random() < 0.5:
            maps, image, target = maps.flip(-2), image.flip(-2), target.flip(-2)
        cues.append(maps)
        images.append(image)
        targets.append(target)
    return torch.cat(cues), torch.cat(images), torch.cat(targets)


def _banks(config: HeadTrainConfig, predictor: Any, cache: Path) -> list[_Bank]:
    """Frame banks of every dataset, read from ``cache`` when it was built with the same datasets and sizes."""
    key = json.dumps([config.datasets, config.images_per_dataset, config.seed])
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as saved:
            if str(saved["key"]) == key:
                names = [str(n) for n in saved["names"]]
                return [
                    _Bank(n, saved[f"frames_{i}"], saved[f"masks_{i}"], [int(v) for v in saved[f"values_{i}"]])
                    for i, n in enumerate(names)
                ]
    banks = [_bank(Path(d), config.images_per_dataset, config.seed, predictor) for d in config.datasets]
    arrays: dict[str, Any] = {"key": key, "names": np.array([b.name for b in banks])}
    for i, b in enumerate(banks):
        arrays[f"frames_{i}"], arrays[f"masks_{i}"], arrays[f"values_{i}"] = b.frames, b.masks, np.array(b.values)
    atomic_write(cache, lambda f: np.savez(f, **arrays))
    return banks


def _bank(folder: Path, count: int, seed: int, predictor: Any) -> _Bank:
    """``count`` images showing foreground (3D: one foreground slice along axis 0 per volume), embedded."""
    dataset = open_dataset(folder)
    cases = [c for c in dataset.cases if c.label is not None]
    values = sorted(int(v) for v in dataset.labels.values() if int(v) != 0)
    if not cases or not values:
        raise MedsegError("no labelled cases", folder)
    rng = np.random.default_rng(seed)
    frames, masks = [], []
    for index in rng.permutation(len(cases)):
        image, label = load_case(cases[int(index)])
        assert label is not None
        array = image.array
        if image.ndim == 3:
            present = np.flatnonzero(label.reshape(label.shape[0], -1).any(axis=1))
            if not len(present):
                continue
            z = int(rng.choice(present))
            array, label = array[z], label[z]
        if not label.any():
            continue
        frames.append(predictor.frame(array).astype(np.float16))
        masks.append(predictor.label_masks(label, values))
        if len(frames) == count:
            break
    if not frames:
        raise MedsegError("no foreground in any label map", folder)
    from medseg.inference.feature_incontext import unpack_masks

    fine = unpack_masks(np.stack(masks)) >= 0.5  # (M, K, 2h, 2w)
    return _Bank(dataset.name or folder.name, np.stack(frames), fine.numpy(), values)
