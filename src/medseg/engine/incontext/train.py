"""`train_incontext`: a UniverSeg-style network trained on episodes (tasks drawn from labelled datasets).

Every iteration draws a batch of episodes with a support size drawn from ``min_support..max_support``
(one size per batch), predicts each query's mask from its support set, and minimises soft Dice + binary
cross-entropy (MONAI ``DiceCELoss`` with a sigmoid). After each epoch: Dice on a fixed, seeded set of
validation episodes from the same datasets (held-in tasks; generalisation to unseen datasets is what
``benchmarks/incontext.py`` measures), then atomic ``checkpoint.pt`` / ``weights.pt`` / ``train.json`` /
``curve.png``. ``resume=True`` continues after a crash. Slice banks are cached as ``.npz`` in
``cache_dir`` (reading the datasets is the slow part).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.data.episodes import EpisodeConfig, EpisodeSampler, SliceBank, build_slice_bank, load_bank, save_bank
from medseg.engine.run_files import atomic_write, plot_curve, write_json
from medseg.errors import MedsegError
from medseg.models.incontext import UniverSeg

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "weights.pt"


@dataclass
class InContextTrainConfig:
    """A training run; plain data, saved as ``config.json`` beside the weights."""

    datasets: list[str]  # dataset folders (nnU-Net raw layout or images/ + masks/)
    encoder_blocks: list[list[int]] = field(default_factory=lambda: [[32, 32]] * 4)
    batch_size: int = 4
    min_support: int = 1
    max_support: int = 16
    learning_rate: float = 1e-3
    iterations_per_epoch: int = 100
    epochs: int = 100
    minutes: float | None = None
    val_episodes: int = 32
    seed: int = 0
    episodes: EpisodeConfig = field(default_factory=EpisodeConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InContextTrainConfig:
        values = dict(data)
        episodes = dict(values.pop("episodes", {}))
        if "zoom_range" in episodes:
            episodes["zoom_range"] = tuple(episodes["zoom_range"])
        return cls(**values, episodes=EpisodeConfig(**episodes))


def build_model(config: InContextTrainConfig) -> UniverSeg:
    return UniverSeg([(int(a), int(b)) for a, b in config.encoder_blocks])


def train_incontext(
    config: InContextTrainConfig,
    output: Path,
    cache_dir: Path | None = None,
    resume: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train as ``config`` says into ``output``; returns the last epoch's record.

    Raises:
        MedsegError: no datasets, unreadable datasets, an output folder holding another run (without
            ``resume``), or a checkpoint that does not fit the config.
    """
    checkpoint_path = output / CHECKPOINT
    if checkpoint_path.exists() and not resume:
        raise MedsegError("already holds a training run; pass --resume to continue it or choose another folder", output)
    if not config.datasets:
        raise MedsegError("in-context training needs at least one dataset")
    if not 1 <= config.min_support <= config.max_support:
        raise MedsegError("support sizes must satisfy 1 <= min_support <= max_support")
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "config.json", asdict(config))
    banks = [_bank(Path(d), config.episodes.size, cache_dir) for d in config.datasets]
    sampler = EpisodeSampler(banks, config.episodes)
    validation = [
        sampler.batch(1, config.max_support, np.random.default_rng([config.seed, 10**6, i]))
        for i in range(config.val_episodes)
    ]
    torch.manual_seed(config.seed)
    model = build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), config.learning_rate, weight_decay=1e-4)
    state: dict[str, Any] = {"epoch": 0, "history": [], "training_seconds": 0.0}
    if resume and checkpoint_path.is_file():
        saved = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        try:
            model.load_state_dict(saved["model"])
        except RuntimeError:
            raise MedsegError("checkpoint does not fit config.json's network", checkpoint_path) from None
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(sigmoid=True, batch=False)
    budget = config.minutes * 60 if config.minutes is not None else float("inf")
    while state["epoch"] < config.epochs and state["training_seconds"] < budget:
        started = time.perf_counter()
        epoch = state["epoch"]
        rng = np.random.default_rng([config.seed, epoch])
        progress = min(1.0, max(epoch / config.epochs, state["training_seconds"] / budget))
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * (1 - progress) ** 0.9
        model.train()
        losses = []
        for _ in range(config.iterations_per_epoch):
            support = int(rng.integers(config.min_support, config.max_support + 1))
            query, images, masks, truth = sampler.batch(config.batch_size, support, rng)
            loss = loss_fn(model(query, images, masks), truth)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_mean_dice": _validate(model, validation)}
        record["seconds"] = round(time.perf_counter() - started, 1)
        state["epoch"] += 1
        state["training_seconds"] += record["seconds"]
        state["history"].append(record)
        payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state}
        _save(checkpoint_path, payload)
        weights = {
            "architecture": {"encoder_blocks": config.encoder_blocks, "size": config.episodes.size},
            "state_dict": model.state_dict(),
        }
        _save(output / WEIGHTS, weights)
        write_json(
            output / "train.json",
            {"config": asdict(config), "history": state["history"], "training_seconds": state["training_seconds"]},
        )
        plot_curve(state["history"], output / "curve.png", "in-context training (validation: held-in episodes)")
        if on_epoch is not None:
            on_epoch(record)
    return state["history"][-1] if state["history"] else {}


def _save(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save(payload, f))


def _bank(dataset: Path, size: int, cache_dir: Path | None) -> SliceBank:
    if cache_dir is None:
        return build_slice_bank(dataset, size)
    cache = cache_dir / f"{dataset.name}_{size}.npz"
    if cache.is_file():
        return load_bank(cache)
    bank = build_slice_bank(dataset, size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_bank(bank, cache)
    return bank


@torch.no_grad()
def _validate(
    model: torch.nn.Module, episodes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
) -> float:
    model.eval()
    scores = []
    for query, images, masks, truth in episodes:
        predicted = model(query, images, masks) > 0
        target = truth > 0.5
        both = float((predicted & target).sum())
        total = float(predicted.sum() + target.sum())
        scores.append(1.0 if total == 0 else 2 * both / total)
    return round(float(np.mean(scores)), 4)
