"""`train`: a supervised network from a dataset and a plan, on one process or many (torchrun + DDP).

One epoch is ``training.iterations_per_epoch`` batches of random augmented patches (nnU-Net's notion of an
epoch), then validation Dice on up to ``training.val_cases_per_epoch`` validation cases (whole images,
sliding window), then an atomic checkpoint. A crash or ``kill -9`` loses at most the running epoch:
``resume=True`` continues from the last checkpoint, with the same split, plan and learning-rate schedule.
A time budget (``minutes``) ends the running epoch where it runs out (then validated and saved), so a run
uses its whole budget; under torchrun, where every rank must take the same steps, epochs stay whole and no
epoch starts that would pass the budget.

Distributed: under ``torchrun --nproc_per_node=N`` (``WORLD_SIZE`` > 1) every rank trains on its own
shard of the training cases (``train[rank::N]``) inside DistributedDataParallel (gloo on CPU, nccl on
GPU), so gradients are averaged each step; rank 0 validates, writes the files and decides when to stop.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.data import open_dataset
from medseg.data.check import require_valid
from medseg.data.dataset import Case, Dataset
from medseg.engine.run_files import atomic_write, plot_curve, write_json
from medseg.engine.supervised.data import PatchSampler, PreparedCase, prepare_case
from medseg.engine.supervised.encoder_maps import EncoderMaps, MapSampler, cache_encoder_maps, map_cache_refusal
from medseg.engine.supervised.genseg import ARCH_IMAGES_PRETRAINED, GenSeg, validation_share
from medseg.engine.supervised.genseg import MODES as GENSEG_MODES
from medseg.engine.supervised.split import make_split
from medseg.errors import MedsegError, notice
from medseg.inference.sliding_window import predict_probabilities
from medseg.io.paths import check_exists, check_output
from medseg.metrics.surface import dice
from medseg.models.supervised import MODEL_NAMES, build_network
from medseg.models.supervised.factory import BACKBONES, check_config
from medseg.planning import (
    Plan,
    check_plan_fits,
    fingerprint_dataset,
    fit_batch_to_budget,
    litemedsam_step_gb,
    make_plan,
    read_plan,
    write_plan,
)

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.pt"
GENERATOR = "generator.pt"  # GenSeg's generator (weights), beside the segmentation network
PAIRS_FIGURE = "genseg_pairs.png"
ENCODER_LR_SCALE = 0.1  # a fine-tuned pretrained encoder learns ten times slower than the new decoder


@dataclass
class TrainOptions:
    """What `train` needs besides the plan's own settings (which ``epochs`` may override)."""

    dataset: Path
    output: Path
    model: str | None = None  # default: the plan's, else "unet"
    plan: Plan | None = None  # None: plan from the data
    fold: int = 0
    folds: int = 5
    val_cases: list[str] | None = None
    num_labelled: int | None = None
    epochs: int | None = None
    minutes: float | None = None  # training-time budget, summed over resumed runs
    seed: int = 0
    resume: bool = False
    memory_gb: float | None = None
    device: str = "auto"  # "auto" (cuda when there is one, else cpu), "cpu", "cuda" or "mps"
    backbone: str = "plain"  # "litemedsam": LiteMedSAM's pretrained TinyViT as the U-Net's encoder (2D)
    fine_tune_encoder: bool = False  # litemedsam: train the encoder too (at a tenth of the learning rate)
    genseg: str | None = None  # "end-to-end" or "separate": GenSeg's pairs (`medseg.engine.supervised.genseg`)
    genseg_ngf: int = 16  # the generator's first-level channels


@dataclass
class TrainResult:
    model_dir: Path
    epochs: int
    training_seconds: float
    images_per_second: float
    val_dice: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    batch_size: int = 0  # the plan's (lowered from the planned batch when a pretrained encoder or GenSeg needs it)


@dataclass
class _Context:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def train(
    options: TrainOptions,
    on_iteration: Callable[[int, int, float], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train as ``options`` and the plan say; write ``plan.json``, ``split.json``, ``checkpoint.pt``,
    ``model.pt`` (weights only), ``train.json`` and ``curve.png`` into ``options.output``.

    Args:
        on_iteration: called on rank 0 after each batch with ``(epoch, iteration, loss)``.
        on_epoch: called on rank 0 after each epoch with its record (loss, validation Dice, seconds).

    Raises:
        MedsegError: a dataset that fails ``medseg dataset check``, an invalid or too large plan, an output
            folder holding another run (without ``resume``), too few cases for the split or the ranks.
    """
    context = _start_distributed(options.device)
    mkldnn = bool(torch.backends.mkldnn.enabled)
    try:
        return _train(options, context, on_iteration, on_epoch)
    finally:
        torch.backends.mkldnn.set_flags(mkldnn)
        if context.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(
    options: TrainOptions,
    ctx: _Context,
    on_iteration: Callable[[int, int, float], None] | None,
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> TrainResult:
    out = options.output
    if options.epochs is not None and options.epochs < 1:
        raise MedsegError(f"--epochs must be at least 1, got {options.epochs}")
    if options.minutes is not None and not options.minutes > 0:
        raise MedsegError(f"--minutes must be positive, got {options.minutes}")
    if options.seed < 0:
        raise MedsegError(f"--seed must be a non-negative integer, got {options.seed}")
    if options.memory_gb is not None and not (math.isfinite(options.memory_gb) and options.memory_gb > 0):
        raise MedsegError(f"--memory-gb must be a positive number, got {options.memory_gb}")  # a given plan too
    if options.genseg is not None and options.genseg not in GENSEG_MODES:
        raise MedsegError(f"unknown GenSeg mode {options.genseg!r} (known: {', '.join(GENSEG_MODES)})")
    if options.backbone not in BACKBONES:
        raise MedsegError(f"unknown backbone {options.backbone!r} (known: {', '.join(BACKBONES)})")
    if options.fine_tune_encoder and options.backbone == "plain":
        raise MedsegError("--fine-tune-encoder is for a pretrained encoder: add --backbone litemedsam")
    if options.genseg is not None and ctx.world > 1:
        raise MedsegError("GenSeg trains in one process (its generator and hypergradient are not shared by ranks)")
    if options.genseg is not None and options.num_labelled is not None and options.num_labelled < 3:
        raise MedsegError(
            f"--num-labelled {options.num_labelled} is too few for GenSeg: it keeps a fifth of the labelled "
            "cases (at least one) for its validation loss and needs at least 3"
        )
    _check_output(out, options.dataset)
    checkpoint_path = out / CHECKPOINT
    resuming = options.resume and checkpoint_path.is_file()
    if checkpoint_path.exists() and not options.resume:
        raise MedsegError("already holds a training run; pass --resume to continue it or choose another folder", out)
    dataset = open_dataset(options.dataset)
    require_valid(dataset)
    saved: dict[str, Any] | None = None
    if resuming:
        plan = read_plan(out / "plan.json")
        split = _read_split(out / "split.json")
        saved = _load_checkpoint(checkpoint_path)
        _check_resume_options(options, plan, saved, split, out)
    else:
        if options.model is not None and options.model not in MODEL_NAMES:
            raise MedsegError(f"unknown model {options.model!r} (known: {', '.join(MODEL_NAMES)})")
        plan = options.plan or make_plan(fingerprint_dataset(dataset), options.model or "unet", options.memory_gb)
        if options.model and plan.network.name != options.model:
            raise MedsegError(
                f"the plan is for model {plan.network.name!r}; omit --model or plan again with --model {options.model}"
            )
        if options.backbone != "plain":
            plan.network.backbone = options.backbone
            plan.network.freeze_encoder = not options.fine_tune_encoder
            plan.network.deep_supervision = False
            check_config(plan.network)  # 2D, grey or RGB
            if any(p % 4 for p in plan.patch_size):
                raise MedsegError(f"patch {plan.patch_size}: LiteMedSAM's encoder needs sides that are multiples of 4")
        if options.plan is None:  # planned here for a plain network: the batch fitted again (a given plan is kept)
            fit_batch_to_budget(plan, options.memory_gb, _images_per_sample(options))
        _check_memory(plan, options)
        names = [c.name for c in dataset.cases if c.label is not None]
        try:
            split = make_split(
                names, options.fold, options.folds, options.val_cases, options.num_labelled, options.seed
            )
        except MedsegError as error:
            raise MedsegError(error.problem, options.dataset) from None
        if options.genseg is not None:
            split = _genseg_split(split, options.seed, options.dataset)
    if options.epochs is not None:
        plan.training.epochs = options.epochs
    if len(split["train"]) < ctx.world:
        raise MedsegError(
            f"{len(split['train'])} training cases cannot be shared by {ctx.world} processes", options.dataset
        )
    by_name = {c.name: c for c in dataset.cases if c.label is not None}
    genseg_val = split.get("genseg_val", [])
    if options.genseg is not None and not genseg_val:
        raise MedsegError("split.json has no GenSeg validation cases: the run was not a GenSeg run", out)
    missing = sorted(set(split["train"] + split["val"] + genseg_val) - set(by_name))
    if missing:
        raise MedsegError(f"split.json names cases without a label in the dataset: {', '.join(missing[:5])}", out)
    _check_fits_data(plan, by_name[split["train"][0]], dataset)
    torch.manual_seed(options.seed)
    network = build_network(plan.network).to(ctx.device)  # an unbuildable network fails before anything is written
    if plan.network.backbone == "litemedsam" and saved is None:
        from medseg.models.supervised.litemedsam_unet import load_pretrained_encoder

        load_pretrained_encoder(network)  # type: ignore[arg-type]
    if saved is not None:
        try:
            network.load_state_dict(saved["model"])
        except RuntimeError:
            message = "checkpoint does not fit plan.json's network (was plan.json edited?)"
            raise MedsegError(message, checkpoint_path) from None
        before = saved["state"]
        budget = options.minutes * 60 if options.minutes is not None else math.inf
        last_epoch_s = float(before["history"][-1].get("seconds", 0.0)) if before.get("history") else 0.0
        spent = _budget_spent(before["training_seconds"], last_epoch_s, budget, ctx)
        if before["epoch"] >= plan.training.epochs or spent:
            done = f"{before['epoch']} epochs and {before['training_seconds'] / 60:.1f} min"
            raise MedsegError(f"the run has already trained {done}; give more --epochs or --minutes to continue", out)
    shard = [prepare_case(by_name[n], plan, options.seed) for n in split["train"][ctx.rank :: ctx.world]]
    if not any(case.foreground for case in shard):
        raise MedsegError(
            f"every training case's label map is empty ({len(split['train'])} cases): nothing to learn", options.dataset
        )
    val = (
        [prepare_case(by_name[n], plan) for n in split["val"][: plan.training.val_cases_per_epoch]] if ctx.main else []
    )
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(out)
        write_plan(plan, out / "plan.json")
        write_json(out / "split.json", split)
    sampler = PatchSampler(shard, plan)

    optimizer = _optimizer(network, plan)
    state: dict[str, Any] = {"epoch": 0, "history": [], "training_seconds": 0.0, "images": 0, "train_seconds": 0.0}
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
    model: nn.Module = network
    if ctx.world > 1:
        model = nn.parallel.DistributedDataParallel(
            network, device_ids=[ctx.device] if ctx.device.type == "cuda" else None
        )
    loss_fn = _loss(plan)
    training = plan.training
    budget_s = options.minutes * 60 if options.minutes is not None else math.inf
    genseg = None
    if options.genseg is not None:
        if plan.spatial_dims == 3 and ctx.device.type == "cpu":
            # oneDNN's weight gradient of a stride-2 ConvTranspose3d with 8-wide kernels on 4-voxel maps is
            # wrong (NaN, or heap corruption on 3-voxel maps; torch 2.13 CPU): the reference kernels are right
            torch.backends.mkldnn.set_flags(False)
        genseg = GenSeg(
            plan,
            model,
            optimizer,
            lambda output, labels: _total_loss(loss_fn, output, labels),
            [prepare_case(by_name[n], plan, options.seed) for n in genseg_val],
            options.genseg,
            options.genseg_ngf,
            ctx.device,
            arch_images=ARCH_IMAGES_PRETRAINED if plan.network.backbone == "litemedsam" else None,
        )
        if saved is not None and "genseg" in saved:
            genseg.load_state_dict(saved["genseg"])
    encoding_started = time.perf_counter()
    map_sampler, state["encoder_maps"] = _encoder_map_sampler(
        network, shard, plan, options, ctx, budget_s - state["training_seconds"]
    )
    state["training_seconds"] += time.perf_counter() - encoding_started  # the budget pays for the encoding, or its try
    while True:
        epoch = state["epoch"]
        if ctx.world > 1:  # every rank follows rank 0's clock, so that all use the same learning rate
            clock = torch.tensor([state["training_seconds"]], dtype=torch.float64, device=ctx.device)
            torch.distributed.broadcast(clock, 0)
            state["training_seconds"] = float(clock.item())
        progress = _schedule_progress(epoch, training.epochs, state["training_seconds"], budget_s)
        for group in optimizer.param_groups:
            # nnU-Net's poly schedule
            group["lr"] = training.learning_rate * group.get("lr_scale", 1.0) * (1 - progress) ** 0.9
        started = time.perf_counter()
        rng = np.random.default_rng([options.seed, ctx.rank, epoch])
        model.train()
        losses = []
        for iteration in range(training.iterations_per_epoch):
            # One process: the budget ends the epoch where it runs out (the epoch is validated and saved).
            # Under torchrun every rank must take the same steps, so epochs there are whole.
            used = state["training_seconds"] + time.perf_counter() - started
            if iteration and ctx.world == 1 and used >= budget_s:
                break
            if map_sampler is not None:
                maps, images, labels = map_sampler.batch(training.batch_size, rng)
                maps = [m.to(ctx.device) for m in maps]
            else:
                images, labels = sampler.batch(training.batch_size, rng)
            images, labels = images.to(ctx.device), labels.to(ctx.device)
            if genseg is not None:  # its stages follow the schedule within the epoch too
                now = state["training_seconds"] + time.perf_counter() - started
                done = epoch + iteration / training.iterations_per_epoch
                within = _schedule_progress(done, training.epochs, now, budget_s)
                losses.append(genseg.step(images, labels, rng, within))
            else:
                optimizer.zero_grad(set_to_none=True)
                output = model(images) if map_sampler is None else network.decode(maps, images)  # type: ignore[operator]
                loss = _total_loss(loss_fn, output, labels)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
                optimizer.step()
                losses.append(float(loss.detach()))
            if ctx.main and on_iteration is not None:
                on_iteration(epoch, iteration, losses[-1])
        train_seconds = time.perf_counter() - started
        if not np.isfinite(np.mean(losses)):  # nothing of this epoch is saved: the last checkpoint stays good
            raise MedsegError(
                f"training diverged: the loss is {np.mean(losses)} in epoch {epoch + 1} (the run's files are "
                f"from epoch {epoch}; try a lower learning rate in plan.json)",
                out,
            )
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "iterations": len(losses),
            "loss": float(np.mean(losses)),
            "learning_rate": optimizer.param_groups[0]["lr"],
        }
        if ctx.main:
            record["val_dice"] = _validate(network, val, plan, ctx.device)
            record["val_mean_dice"] = float(np.mean(list(record["val_dice"].values()))) if record["val_dice"] else None
        epoch_seconds = time.perf_counter() - started
        record["seconds"] = round(epoch_seconds, 2)
        state["epoch"] = epoch + 1
        state["history"].append(record)
        state["training_seconds"] += epoch_seconds
        state["train_seconds"] += train_seconds
        state["images"] += len(losses) * training.batch_size * ctx.world
        spent = _budget_spent(state["training_seconds"], epoch_seconds, budget_s, ctx)
        stop = state["epoch"] >= training.epochs or spent
        if ctx.main:
            _save_checkpoint(checkpoint_path, network, optimizer, state, genseg)
            atomic_write(out / WEIGHTS, lambda f: torch.save(network.state_dict(), f))
            if genseg is not None:
                atomic_write(out / GENERATOR, lambda f: torch.save(genseg.generator.state_dict(), f))
                genseg.save_pairs_figure(shard, out / PAIRS_FIGURE, np.random.default_rng([options.seed, 7]))
            encoder = " (LiteMedSAM encoder)" if plan.network.backbone == "litemedsam" else ""
            plot_curve(state["history"], out / "curve.png", f"{plan.network.name}{encoder} on {plan.dataset_name}")
            if on_epoch is not None:
                on_epoch(record)
        if ctx.world > 1:
            flag = torch.tensor([int(stop)], device=ctx.device)
            torch.distributed.broadcast(flag, 0)
            stop = bool(flag.item())
        if stop:
            break
    hashes = _parameter_hashes(network, ctx)
    last = state["history"][-1]
    result = TrainResult(
        out,
        state["epoch"],
        state["training_seconds"],
        state["images"] / max(state["train_seconds"], 1e-9),
        last.get("val_dice") or {},
        state["history"],
        plan.training.batch_size,
    )
    if ctx.main:
        write_json(
            out / "train.json",
            {
                "dataset": str(options.dataset),
                "model": plan.network.name,
                "epochs": result.epochs,
                "training_seconds": round(result.training_seconds, 1),
                "images_per_second": round(result.images_per_second, 2),
                "processes": ctx.world,
                "rank_parameter_hashes": hashes,
                "val_dice": result.val_dice,
                "history": state["history"],
                "seed": options.seed,
                "backbone": plan.network.backbone,
                "freeze_encoder": plan.network.freeze_encoder,
                "genseg": None if genseg is None else genseg.summary(),
                "encoder_maps": state["encoder_maps"],
            },
        )
    return result


def _check_resume_options(
    options: TrainOptions, plan: Plan, saved: dict[str, Any], split: dict[str, list[str]], out: Path
) -> None:
    """A resumed run keeps the method it was started with: refuse options that would change it (the same
    command with ``--resume`` added passes)."""
    mode = saved.get("genseg", {}).get("mode") if isinstance(saved.get("genseg"), dict) else None
    if mode != options.genseg:
        was = f"--genseg --genseg-mode {mode}" if mode else "without --genseg"
        now = f"--genseg --genseg-mode {options.genseg}" if options.genseg else "without --genseg"
        raise MedsegError(f"the run was trained {was}; resume it the same way (not {now})", out)
    if options.backbone != "plain" and options.backbone != plan.network.backbone:
        raise MedsegError(f"the run's backbone is {plan.network.backbone!r}; resume without --backbone", out)
    if options.fine_tune_encoder and plan.network.freeze_encoder:
        raise MedsegError("the run keeps its encoder frozen; resume without --fine-tune-encoder", out)
    labelled = len(split["train"]) + len(split.get("genseg_val", []))
    if options.num_labelled is not None and options.num_labelled != labelled:
        message = f"the run trains on {labelled} labelled cases (split.json); resume without --num-labelled"
        raise MedsegError(message, out)
    if options.memory_gb is not None:  # the run keeps its plan (and batch): a budget given now is checked, not applied
        _check_memory(plan, options)


def _schedule_progress(epoch: float, epochs: int, seconds: float, budget_s: float) -> float:
    """The share of the schedule done: epochs or time, whichever is further (as the learning rate's)."""
    return min(1.0, max(epoch / epochs, seconds / budget_s if math.isfinite(budget_s) else 0.0))


def _budget_spent(seconds: float, last_epoch_s: float, budget_s: float, ctx: _Context) -> bool:
    """The rule the loop stops by (and a resume checks): one process ends an epoch where the budget runs
    out, so it trains until the budget is spent; under torchrun epochs are whole, so another epoch only as
    long as one like the last would not pass the budget."""
    if ctx.world == 1:
        return seconds >= budget_s
    return seconds + last_epoch_s > budget_s


def _encoder_map_sampler(
    network: nn.Module,
    shard: list[PreparedCase],
    plan: Plan,
    options: TrainOptions,
    ctx: _Context,
    budget_left_s: float,
) -> tuple[MapSampler | None, str]:
    """A sampler of cached encoder maps (`medseg.engine.supervised.encoder_maps`) where the run allows one,
    and what train.json says about it: cached (cases, seconds) or why not. Cached maps say so on stderr:
    they change the augmentation."""
    refusal = map_cache_refusal(plan, shard, options.genseg is not None, ctx.world)
    if refusal is None:
        cached = cache_encoder_maps(network, shard, plan, ctx.device, budget_left_s)
        if isinstance(cached, EncoderMaps):
            notice(
                f"the frozen encoder's maps of the {len(shard)} training cases were computed once "
                f"({cached.seconds:.0f} s); the decoder trains on them, with no augmentation but the maps flipped "
                "with their labels"
            )
            return MapSampler(cached, plan), f"cached: {len(shard)} cases in {cached.seconds:.1f} s"
        refusal = cached
    if plan.network.backbone != "litemedsam":
        return None, "not used"
    if plan.network.freeze_encoder and options.genseg is None:  # a run that could have been fast: say why not
        notice(f"the frozen encoder runs at every training step (its maps are not cached: {refusal})")
    return None, f"not cached: {refusal}"


def _images_per_sample(options: TrainOptions) -> int:
    """Images a training step holds per batch entry: GenSeg's steps add as many generated ones."""
    return 2 if options.genseg is not None else 1


def _check_memory(plan: Plan, options: TrainOptions) -> None:
    """Refuse a plan whose training step, or (GenSeg with a LiteMedSAM encoder) whose architecture step, is
    estimated to exceed the memory budget (``options.memory_gb``, else the plan's)."""
    check_plan_fits(plan, options.memory_gb, _images_per_sample(options))
    if options.genseg is not None and plan.network.backbone == "litemedsam":
        _check_architecture_step_fits(plan, options.memory_gb)


def _check_architecture_step_fits(plan: Plan, budget_gb: float | None) -> None:
    """Refuse GenSeg with a LiteMedSAM encoder when its architecture step (`ARCH_IMAGES_PRETRAINED` real and as
    many generated images, differentiated through an unrolled step) is estimated to exceed the memory budget."""
    budget = plan.memory_budget_gb if budget_gb is None else budget_gb
    need = litemedsam_step_gb(plan.network, plan.patch_size, 2 * ARCH_IMAGES_PRETRAINED, architecture=True)
    if need > budget:
        encoder = "frozen" if plan.network.freeze_encoder else "fine-tuned"
        raise MedsegError(
            f"GenSeg's architecture step with the {encoder} LiteMedSAM encoder needs about {need:.1f} GB at patch "
            f"{plan.patch_size} but the memory budget is {budget:.2f} GB: raise --memory-gb"
            + ("" if plan.network.freeze_encoder else " or leave out --fine-tune-encoder")
        )


def _check_output(out: Path, dataset: Path) -> None:
    if out.exists() and not out.is_dir():
        raise MedsegError("is a file; -o needs a folder", out)
    check_exists(dataset)  # a symbolic link loop is named before resolve() trips over it
    check_output(out)
    resolved, data = out.resolve(), dataset.resolve()
    if resolved == data or data in resolved.parents:
        raise MedsegError("the model folder must not be inside the dataset (it would be read as data)", out)


def _genseg_split(split: dict[str, list[str]], seed: int, dataset: Path) -> dict[str, list[str]]:
    """GenSeg's split of the labelled training cases: `validation_share` of them (seeded) move to
    ``genseg_val``, the architecture's validation loss; the rest train (40 -> 32 + 8)."""
    train = split["train"]
    if len(train) < 3:
        raise MedsegError(f"GenSeg needs at least 3 labelled training cases, the split has {len(train)}", dataset)
    rng = np.random.default_rng(seed + 2)
    picked = set(rng.choice(len(train), validation_share(len(train)), replace=False).tolist())
    return {
        "train": [n for i, n in enumerate(train) if i not in picked],
        "val": split["val"],
        "genseg_val": [n for i, n in enumerate(train) if i in picked],
    }


def _read_split(path: Path) -> dict[str, list[str]]:
    try:
        split = json.loads(path.read_text())
    except FileNotFoundError:
        raise MedsegError("missing: the run cannot be resumed without its split", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MedsegError(f"not valid JSON ({error})", path) from None
    if not isinstance(split, dict) or not all(isinstance(split.get(k), list) for k in ("train", "val")):
        raise MedsegError('expected {"train": [...], "val": [...]}', path)
    return split


def _check_fits_data(plan: Plan, case: Case, dataset: Dataset) -> None:
    """The plan's dimensionality, channels and labels against one case and the dataset's declaration."""
    from medseg.data.cases import load_case

    image, _ = load_case(case)
    if image.ndim != plan.spatial_dims or image.channels != plan.channels:
        raise MedsegError(
            f"the plan is for {plan.spatial_dims}D images with {plan.channels} channel(s), the dataset has "
            f"{image.ndim}D images with {image.channels}",
            dataset.root,
        )
    declared = dataset.labels
    if declared and {str(k): int(v) for k, v in declared.items()} != plan.labels:
        raise MedsegError(f"the plan's labels {plan.labels} differ from dataset.json's {declared}", dataset.root)


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files of writes a crash interrupted (``.model.pt.x8k2``): never renamed, never needed."""
    for name in (CHECKPOINT, WEIGHTS, GENERATOR, PAIRS_FIGURE, "train.json", "curve.png", "plan.json", "split.json"):
        for stale in out.glob(f".{name}.*"):
            stale.unlink(missing_ok=True)


def _start_distributed(device: str) -> _Context:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise MedsegError("--device cuda asked for, but this torch build sees no CUDA device")
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise MedsegError("--device mps asked for, but this machine has no MPS device")
        if world > 1:
            raise MedsegError("--device mps trains in one process; under torchrun use cuda or cpu")
        return _Context(device=torch.device("mps"))
    if world <= 1:
        return _Context(device=torch.device("cuda" if use_cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return _Context(torch.distributed.get_rank(), world, torch.device(f"cuda:{local}" if use_cuda else "cpu"))


def _optimizer(network: nn.Module, plan: Plan) -> torch.optim.Optimizer:
    """The plan's optimiser on the trainable parameters; a fine-tuned pretrained encoder in its own group at
    `ENCODER_LR_SCALE` of the learning rate (``lr_scale``, kept by the schedule)."""
    t = plan.training
    encoder = [p for n, p in network.named_parameters() if p.requires_grad and n.startswith("image_encoder.")]
    others = [p for n, p in network.named_parameters() if p.requires_grad and not n.startswith("image_encoder.")]
    groups: list[dict[str, Any]] = [{"params": others, "lr_scale": 1.0}]
    if encoder:
        groups.append({"params": encoder, "lr_scale": ENCODER_LR_SCALE, "lr": t.learning_rate * ENCODER_LR_SCALE})
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, t.learning_rate, momentum=0.99, nesterov=True, weight_decay=t.weight_decay)
    return torch.optim.AdamW(groups, t.learning_rate, weight_decay=t.weight_decay)


def _loss(plan: Plan) -> nn.Module:
    from monai.losses import DiceCELoss, DiceLoss

    if plan.training.loss == "dice":  # V-Net's Dice: squared terms in the denominator
        return DiceLoss(to_onehot_y=True, softmax=True, squared_pred=True, include_background=False, batch=True)
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)


def _total_loss(loss_fn: nn.Module, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if output.ndim == labels.ndim:  # one output
        return loss_fn(output, labels)
    # Deep supervision (MONAI DynUNet): (B, S, K, *spatial), every output at full size; weights halve with
    # depth and are normalised (nnU-Net).
    weights = torch.tensor([0.5**i for i in range(output.shape[1])])
    weights = weights / weights.sum()
    total = torch.zeros(())
    for i, weight in enumerate(weights.tolist()):
        total = total + weight * loss_fn(output[:, i], labels)
    return total


@torch.no_grad()
def _validate(network: nn.Module, cases: list[PreparedCase], plan: Plan, device: torch.device) -> dict[str, float]:
    network.eval()
    names = {v: k for k, v in plan.labels.items()}
    scores: dict[str, list[float]] = {names[v]: [] for v in plan.label_values() if v}
    for case in cases:
        image = torch.from_numpy(case.image).to(device)
        prediction = predict_probabilities(network, image, plan.patch_size, (), batch_size=plan.training.batch_size)
        labels = prediction.argmax(0).cpu().numpy()
        for value in plan.label_values():
            if value:
                scores[names[value]].append(dice(labels == value, case.label == value))
    return {name: round(float(np.mean(s)), 4) for name, s in scores.items() if s}


def _parameter_hashes(network: nn.Module, ctx: _Context) -> list[str]:
    digest = hashlib.sha256()
    for tensor in network.state_dict().values():
        digest.update(tensor.detach().cpu().numpy().tobytes())
    mine = digest.hexdigest()[:16]
    if ctx.world == 1:
        return [mine]
    gathered: list[Any] = [None] * ctx.world
    torch.distributed.all_gather_object(gathered, mine)
    return [str(h) for h in gathered]


def _save_checkpoint(
    path: Path, network: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], genseg: GenSeg | None
) -> None:
    payload = {"model": network.state_dict(), "optimizer": optimizer.state_dict(), "state": state}
    if genseg is not None:
        payload["genseg"] = genseg.state_dict()
    atomic_write(path, lambda f: torch.save(payload, f))


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises many types for corrupt files
        raise MedsegError(f"cannot read checkpoint ({type(error).__name__}: {error})", path) from None
    if not isinstance(saved, dict) or not {"model", "optimizer", "state"} <= set(saved):
        raise MedsegError("not a medseg training checkpoint", path)
    return saved
