"""Fine-tune a SAM-family model's mask decoder on a labelled dataset with boxes simulated from the labels.

As MedSAM (Ma et al. 2024) trains: each object's ground-truth bounding box, each side jittered by a
random shift, prompts the model; the loss is Dice + binary cross-entropy on the low-resolution mask
logits, plus the mean squared error of the predicted IoU (as LiteMedSAM trains its IoU head). The
image encoder stays frozen by default, so every image is embedded once and the embeddings are cached:
this is what makes fine-tuning feasible on a CPU. The prompt encoder stays frozen, as in MedSAM.

Validation Dice is measured in the decoder's 256 x 256 output frame with exact ground-truth boxes.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medseg.data import open_dataset
from medseg.data.check import require_valid
from medseg.errors import MedsegError
from medseg.inference.click_simulation import interior_point, next_click
from medseg.inference.prompt_predictor import PromptPredictor
from medseg.inference.prompt_session import model_input
from medseg.io import as_label_array, load
from medseg.models.promptable.segmenter import PromptableSegmenter

LOW_RES = 256  # the mask decoder's output size


@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run (round-trips through ``finetune.json``)."""

    epochs: int = 20
    minutes: float | None = None  # wall-clock budget; stops after the epoch that crosses it
    lr: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 8
    box_jitter: float = 0.1  # each box side moves by up to this fraction of the box size
    val_fraction: float = 0.2
    seed: int = 0
    max_cases: int | None = None  # cases drawn (seeded) from the dataset; None takes all
    train_encoder: bool = False
    clicks: int = 0  # > 0: also train clicks (up to this many per object) and the prompt encoder

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class FinetuneResult:
    """Validation Dice per label before and after, and where the weights went."""

    val_dice_before: dict[int, float]
    val_dice_after: dict[int, float]
    checkpoint_path: Path
    epochs_run: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class _Objects:
    """Every (image, label) pair as tensors in the model frame."""

    images: list[torch.Tensor]  # (3, S, S) each
    masks: torch.Tensor  # (K, 1, 256, 256) float 0/1, one per object
    boxes: torch.Tensor  # (K, 4) exact boxes in the S frame
    image_index: torch.Tensor  # (K,) which image each object is on
    labels: torch.Tensor  # (K,) label value of each object


def finetune(
    dataset_dir: Path | list[Path],
    out_dir: Path,
    config: FinetuneConfig,
    checkpoint: Path | None = None,
    model_name: str | None = None,
    resume: bool = False,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> FinetuneResult:
    """Fine-tune on ``dataset_dir`` (nnU-Net layout or images/ + masks/; 3D volumes give their slices;
    a list of datasets is pooled, each split into training and validation cases by itself).

    Writes ``out_dir/<model>_finetuned.pth`` (a full state_dict that ``medseg prompt --checkpoint``
    loads) and ``out_dir/finetune.json`` atomically after every epoch; ``resume`` continues from them.

    Raises:
        MedsegError: the dataset fails `check_dataset`, holds no labelled objects, or ``resume`` finds
            no previous run.
    """
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    predictor = PromptPredictor.from_checkpoint(checkpoint, model_name)
    model, spec = predictor.model, predictor.spec
    state_path = out_dir / f"{spec.name}_finetuned.pth"
    record_path = out_dir / "finetune.json"
    if resume and not (state_path.is_file() and record_path.is_file()):
        raise MedsegError(f"nothing to resume: no finetune.json and {state_path.name} there", out_dir)
    splits = [
        _load_split(d, predictor, config) for d in ([dataset_dir] if isinstance(dataset_dir, Path) else dataset_dir)
    ]
    train, val = _concat([s[0] for s in splits]), _concat([s[1] for s in splits])
    history: list[dict[str, float]] = []
    if resume:
        record = json.loads(record_path.read_text())
        history = record["history"]
        model.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
    prefixes = ("mask_decoder.", "prompt_encoder.") if config.clicks else ("mask_decoder.",)
    trainable = [p for n, p in model.named_parameters() if n.startswith(prefixes)]
    if config.train_encoder:
        trainable += list(model.image_encoder.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    embed = None if config.train_encoder else _embed_all(model, train.images + val.images)
    val_offset = len(train.images)
    before = (
        {int(k): v for k, v in record["val_dice_before"].items()}
        if resume
        else _validate(model, val, embed, val_offset)
    )
    generator = torch.Generator().manual_seed(config.seed + len(history))
    from monai.losses import DiceCELoss

    seg_loss = DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")
    for epoch in range(len(history), config.epochs):
        model.train()
        model.image_encoder.train(config.train_encoder)
        order = torch.randperm(len(train.boxes), generator=generator)
        losses = []
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            boxes = _jitter(train.boxes[batch], config.box_jitter, spec.image_size, generator)
            if embed is None:
                features = model.embed_image(torch.stack([train.images[int(i)] for i in train.image_index[batch]]))
            else:
                features = embed[train.image_index[batch]]
            target = train.masks[batch]
            if config.clicks:
                logits, iou_pred = _decode_with_clicks(model, features, boxes, target, config.clicks, generator)
            else:
                logits, iou_pred = model.decode(features, boxes=boxes)
            with torch.no_grad():
                iou_true = _iou(logits > 0, target > 0)
            loss = seg_loss(logits, target) + F.mse_loss(iou_pred[:, 0], iou_true)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        after = _validate(model, val, embed, val_offset)
        entry = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_dice": float(np.mean(list(after.values())))}
        history.append(entry)
        _save(model, state_path, record_path, config, spec.name, before, after, history)
        if on_epoch is not None:
            on_epoch(entry)
        if config.minutes is not None and time.perf_counter() - started > 60 * config.minutes:
            break
    final = _validate(model, val, embed, val_offset)
    if not history:
        _save(model, state_path, record_path, config, spec.name, before, final, history)
    return FinetuneResult(before, final, state_path, len(history), time.perf_counter() - started, history)


def _load_split(dataset_dir: Path, predictor: PromptPredictor, config: FinetuneConfig) -> tuple[_Objects, _Objects]:
    dataset = open_dataset(dataset_dir)
    require_valid(dataset)
    cases = [c for c in dataset.cases if c.label is not None]
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(cases))
    if config.max_cases is not None:
        order = order[: config.max_cases]
    n_val = max(1, round(config.val_fraction * len(order)))
    if len(order) < 2:
        raise MedsegError("fine-tuning needs at least two labelled cases (one for validation)", dataset_dir)
    picked = [cases[i] for i in order]
    split = (picked[n_val:], picked[:n_val])
    out = tuple(_objects(part, predictor, dataset.modality) for part in split)
    if not len(out[0].boxes) or not len(out[1].boxes):
        raise MedsegError("no labelled objects in the training or validation cases", dataset_dir)
    return out  # type: ignore[return-value]


def _concat(parts: list[_Objects]) -> _Objects:
    offsets = np.cumsum([0] + [len(p.images) for p in parts[:-1]])
    return _Objects(
        [image for p in parts for image in p.images],
        torch.cat([p.masks for p in parts]),
        torch.cat([p.boxes for p in parts]),
        torch.cat([p.image_index + int(o) for p, o in zip(parts, offsets, strict=True)]),
        torch.cat([p.labels for p in parts]),
    )


def _objects(cases: list[Any], predictor: PromptPredictor, modality: str) -> _Objects:
    images: list[torch.Tensor] = []
    masks, boxes, index, labels = [], [], [], []
    size = predictor.spec.image_size
    for case in cases:
        image, label = load(case.images[0]), as_label_array(load(case.label))
        image.meta.setdefault("modality", modality)
        shown = model_input(image)
        slices = [(shown, label)] if image.ndim == 2 else [(shown[z], label[z]) for z in range(label.shape[0])]
        for picture, truth in slices:
            present = [int(v) for v in np.unique(truth) if v != 0]
            if not present:
                continue
            tensor, _, resized = predictor.prepare(picture)
            images.append(tensor)
            frame = _label_frame(truth, resized, size)
            for value in present:
                mask = frame == value
                if not mask.any():
                    continue  # too small to survive resizing
                rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
                scale = size / LOW_RES
                boxes.append([cols[0] * scale, rows[0] * scale, (cols[-1] + 1) * scale, (rows[-1] + 1) * scale])
                masks.append(torch.from_numpy(mask[None].astype(np.float32)))
                index.append(len(images) - 1)
                labels.append(value)
    return _Objects(
        images,
        torch.stack(masks) if masks else torch.zeros(0, 1, LOW_RES, LOW_RES),
        torch.tensor(boxes, dtype=torch.float32).view(-1, 4),
        torch.tensor(index, dtype=torch.long),
        torch.tensor(labels, dtype=torch.long),
    )


def _label_frame(label: np.ndarray, resized: tuple[int, int], size: int) -> np.ndarray:
    """The label map in the decoder's 256 x 256 frame (resized to the image's (h, w) in the S x S frame,
    padded, nearest)."""
    new_h, new_w = resized
    tensor = torch.from_numpy(label.astype(np.int64))[None, None].float()
    shrunk = F.interpolate(tensor, (new_h, new_w), mode="nearest-exact")
    padded = F.pad(shrunk, (0, size - new_w, 0, size - new_h))
    return F.interpolate(padded, (LOW_RES, LOW_RES), mode="nearest-exact")[0, 0].long().numpy()


def _embed_all(model: PromptableSegmenter, images: list[torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.inference_mode():
        return torch.cat([model.embed_image(torch.stack(images[i : i + 4])) for i in range(0, len(images), 4)])


def _validate(model: PromptableSegmenter, val: _Objects, embed: torch.Tensor | None, offset: int) -> dict[int, float]:
    model.eval()
    scores: dict[int, list[float]] = {}
    with torch.inference_mode():
        for start in range(0, len(val.boxes), 16):
            sl = slice(start, start + 16)
            if embed is None:
                features = model.embed_image(torch.stack([val.images[int(i)] for i in val.image_index[sl]]))
            else:
                features = embed[val.image_index[sl] + offset]
            logits, _ = model.decode(features, boxes=val.boxes[sl])
            dice = _dice(logits > 0, val.masks[sl] > 0)
            for value, d in zip(val.labels[sl].tolist(), dice.tolist(), strict=True):
                scores.setdefault(value, []).append(d)
    return {k: float(np.mean(v)) for k, v in sorted(scores.items())}


def _decode_with_clicks(
    model: PromptableSegmenter,
    features: torch.Tensor,
    boxes: torch.Tensor,
    target: torch.Tensor,
    max_clicks: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM-style interactive training step: a box or one click first (coin flip per batch), then up to
    ``max_clicks - 1`` corrective clicks simulated without gradients from the model's own errors, each
    round feeding the previous logits back as the mask prompt; the last round carries the gradient."""
    truth = (target[:, 0] > 0).numpy()
    scale = model.prompt_encoder.input_image_size[0] / LOW_RES
    use_box = bool(torch.rand(1, generator=generator) < 0.5)
    points = [[interior_point(t)] for t in truth] if not use_box else [[] for _ in truth]
    labels = [[1] for _ in truth] if not use_box else [[] for _ in truth]
    rounds = int(torch.randint(0, max_clicks, (1,), generator=generator))
    mask_logits = None
    for _ in range(rounds + 1):
        prompt = _point_tensors(points, labels, scale) if points[0] else None
        logits, iou_pred = model.decode(
            features, boxes=boxes if use_box else None, points=prompt, mask_logits=mask_logits
        )
        if _ == rounds:
            return logits, iou_pred
        with torch.no_grad():
            pred = (logits[:, 0] > 0).numpy()
            for i in range(len(truth)):
                click = next_click(pred[i], truth[i])
                points[i].append(click[0] if click else (0, 0))
                labels[i].append(click[1] if click else -1)  # -1: a padding point SAM ignores
            mask_logits = logits.detach()
    raise AssertionError("unreachable")


def _point_tensors(
    points: list[list[tuple[int, int]]], labels: list[list[int]], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel centres of the 256 frame -> (N, P, 2) coordinates in the model frame, (N, P) labels."""
    coords = torch.tensor(points, dtype=torch.float32) * scale  # the prompt encoder adds the +0.5 itself
    return coords, torch.tensor(labels, dtype=torch.long)


def _iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    inter = (pred & target).flatten(1).sum(1).float()
    union = (pred | target).flatten(1).sum(1).float()
    return inter / union.clamp(min=1)


def _dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    inter = (pred & target).flatten(1).sum(1).float()
    total = pred.flatten(1).sum(1).float() + target.flatten(1).sum(1).float()
    return 2 * inter / total.clamp(min=1)


def _jitter(boxes: torch.Tensor, fraction: float, size: int, generator: torch.Generator) -> torch.Tensor:
    """Move each side by up to ``fraction`` of the box's width/height (seeded), inside the frame."""
    if fraction <= 0:
        return boxes
    extent = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, dim=1)
    shift = (torch.rand(boxes.shape, generator=generator) * 2 - 1) * fraction * extent
    moved = (boxes + shift).clamp(0, size)
    x0, x1 = torch.minimum(moved[:, 0], moved[:, 2] - 1), torch.maximum(moved[:, 2], moved[:, 0] + 1)
    y0, y1 = torch.minimum(moved[:, 1], moved[:, 3] - 1), torch.maximum(moved[:, 3], moved[:, 1] + 1)
    return torch.stack([x0, y0, x1, y1], dim=1)


def _save(
    model: torch.nn.Module,
    state_path: Path,
    record_path: Path,
    config: FinetuneConfig,
    name: str,
    before: dict[int, float],
    after: dict[int, float],
    history: list[dict[str, float]],
) -> None:
    """Checkpoint and record, each written to a temporary file then renamed (a crash loses one epoch)."""
    state_path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "model": name,
        "config": asdict(config),
        "val_dice_before": before,
        "val_dice_after": after,
        "history": history,
        "note": "validation Dice in the decoder's 256x256 frame with exact ground-truth boxes",
    }
    for path, write in (
        (state_path, lambda f: torch.save(model.state_dict(), f)),
        (record_path, lambda f: f.write(json.dumps(record, indent=2, default=_json_default).encode())),
    ):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)


def _json_default(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(type(value).__name__)
