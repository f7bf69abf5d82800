"""A per-task probe: a small classifier fitted, at inference, to the support set's frozen features.

Few-shot segmentation by fitting only a light head on frozen foundation-model features, the encoder never
updated: the linear/MLP probe of self-supervised feature evaluation (DINOv2, Oquab et al. 2023, linear
segmentation heads) applied to one support set, as in the "fine-tune the last layer only" few-shot
baselines (Wang et al., "Frustratingly simple few-shot object detection", ICML 2020). No weights ship:
every support set fits its own probe (a few hundred Adam steps, one to a few seconds on two CPU cores).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

FLOAT32_COPY_BYTES = 1 << 28  # rows up to this size as float32 are converted once, not per batch
FEATURE_SCALE = 10.0  # unit-length features times this: logits of a useful size at a moderate learning rate


class SupportProbe(nn.Module):
    """``features (M, C) -> foreground logits (M,)``: one hidden layer of ``hidden`` GELU units on the
    L2-normalised features (times `FEATURE_SCALE`)."""

    def __init__(self, channels: int, hidden: int = 64) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classify(F.normalize(features, dim=-1))

    def classify(self, unit_features: torch.Tensor) -> torch.Tensor:
        """`forward` for features ``(M, C)`` already of unit length (skips a pass over a large array)."""
        return self.layers(unit_features * FEATURE_SCALE)[:, 0]


class _Adam:
    """`torch.optim.Adam`'s update with its defaults (betas 0.9 and 0.999, eps 1e-8, no weight decay or
    amsgrad; its single-tensor CPU arithmetic). Not torch.optim itself: an optimiser's first use imports
    ``torch._dynamo`` (over a second of a CLI run that fits only this probe)."""

    def __init__(self, parameters: list[torch.Tensor], learning_rate: float) -> None:
        self.parameters, self.learning_rate, self.steps = parameters, learning_rate, 0
        self.first = [torch.zeros_like(p) for p in parameters]
        self.second = [torch.zeros_like(p) for p in parameters]

    def step(self) -> None:
        beta1, beta2 = 0.9, 0.999
        self.steps += 1
        step_size = self.learning_rate / (1 - beta1**self.steps)
        correction2 = (1 - beta2**self.steps) ** 0.5
        with torch.no_grad():
            for parameter, first, second in zip(self.parameters, self.first, self.second, strict=True):
                assert parameter.grad is not None
                grad = parameter.grad
                first.lerp_(grad, 1 - beta1)
                second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                parameter.addcdiv_(first, (second.sqrt() / correction2).add_(1e-8), value=-step_size)
                parameter.grad = None


def fit_support_probe(
    features: torch.Tensor,
    targets: torch.Tensor,
    hidden: int = 64,
    steps: int = 200,
    batch_size: int = 4096,
    learning_rate: float = 0.01,
    weight_decay: float = 1e-3,
    seed: int = 0,
    normalised: bool = False,
) -> SupportProbe:
    """Fit a `SupportProbe` to feature locations of the support set: `fit_support_probes` for one label.

    Args:
        features: ``(M, C)`` float features, one row per support location (any scale: rows are normalised),
            in any float dtype (batches are fitted in float32: a large float16 set is not copied whole).
        targets: ``(M,)`` foreground fraction of each location in [0, 1] (soft targets).
        other arguments: as `fit_support_probes`.

    Raises:
        ValueError: ``features`` and ``targets`` do not pair up, or no locations.
    """
    if features.ndim != 2 or targets.shape != features.shape[:1] or len(features) == 0:
        shapes = f"{tuple(features.shape)} and {tuple(targets.shape)}"
        raise ValueError(f"features (M, C) and targets (M,) expected, got {shapes}")
    return fit_support_probes(
        features, targets[:, None], hidden, steps, batch_size, learning_rate, weight_decay, seed, normalised
    )[0]


def fit_support_probes(
    features: torch.Tensor,
    targets: torch.Tensor,
    hidden: int = 64,
    steps: int = 200,
    batch_size: int = 4096,
    learning_rate: float = 0.01,
    weight_decay: float = 1e-3,
    seed: int = 0,
    normalised: bool = False,
) -> list[SupportProbe]:
    """Fit one `SupportProbe` per label to the same feature locations, together: each probe is exactly the
    one its own fit with this ``seed`` gives (the same initial weights, batches and arithmetic), while the
    rows are converted and each batch gathered once for all labels, and one backward pass serves them all.

    Args:
        features: ``(M, C)`` float features, one row per support location (any scale: rows are normalised),
            in any float dtype (batches are fitted in float32; a float16 set over `FLOAT32_COPY_BYTES` as
            float32 is not copied whole).
        targets: ``(M, K)`` foreground fraction of each location for each of ``K`` labels, in [0, 1].
        steps: Adam steps, each on ``batch_size`` locations drawn with replacement (all when fewer).
        weight_decay: L2 penalty on the weight matrices (sum of squares, added to the loss).
        seed: the initialisation and the batches (global RNG state untouched).
        normalised: the rows are already as `SupportProbe.classify` takes them (unit-length features, with any
            extra channels appended at their own scale, as `medseg.inference.volume_probe` does): not normalised.

    Returns:
        ``K`` fitted probes in eval mode, in the targets' column order. Each label's loss is binary
        cross-entropy with the classes balanced (the locations of foreground fraction > 0.5 weigh as much in
        total as the others), so a small structure is not drowned by its background.

    Raises:
        ValueError: ``features`` and ``targets`` do not pair up, or no locations or labels.
    """
    if features.ndim != 2 or targets.ndim != 2 or targets.shape[0] != len(features) or targets.numel() == 0:
        shapes = f"{tuple(features.shape)} and {tuple(targets.shape)}"
        raise ValueError(f"features (M, C) and targets (M, K) expected, got {shapes}")
    # callers may be in inference mode (no autograd): fit on ordinary copies with autograd on
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x = features.detach()
        scaled = len(x) <= batch_size or x.numel() * 4 <= FLOAT32_COPY_BYTES
        if scaled:  # one float32 copy as the first layer takes it, not one per batch (an ordinary tensor, too)
            x = (x.float() if normalised else F.normalize(x.float(), dim=-1)) * FEATURE_SCALE
        template = SupportProbe(x.shape[1], hidden)  # every label starts here, as its own fit with this seed would
        probes = [copy.deepcopy(template) for _ in range(targets.shape[1])]
        # each label's targets and class weights computed as its own fit computes them (a column of its own:
        # a reduction over a strided column may round differently, and 400 Adam steps amplify any difference)
        columns = [targets[:, k].detach().float().contiguous() for k in range(targets.shape[1])]
        balances = []
        for y in columns:
            positive = (y > 0.5).float().mean().clamp(1e-3, 1 - 1e-3)
            balances.append(torch.where(y > 0.5, 0.5 / positive, 0.5 / (1 - positive)))
        optimiser = _Adam([p for probe in probes for p in probe.parameters()], learning_rate)
        matrices = [[p for name, p in probe.named_parameters() if name.endswith("weight")] for probe in probes]
        generator = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            if len(x) > batch_size:
                index = torch.randint(len(x), (batch_size,), generator=generator)
                # index_select: several times faster than advanced indexing for a row gather
                xb = x.index_select(0, index).float()
                picked = [
                    (y.index_select(0, index), w.index_select(0, index)) for y, w in zip(columns, balances, strict=True)
                ]
            else:
                xb, picked = x, list(zip(columns, balances, strict=True))
            if not scaled:
                xb = (xb if normalised else F.normalize(xb, dim=-1)) * FEATURE_SCALE
            total = torch.zeros(())
            for probe, (yb, wb), weights in zip(probes, picked, matrices, strict=True):
                loss = (F.binary_cross_entropy_with_logits(probe.layers(xb)[:, 0], yb, reduction="none") * wb).mean()
                total = total + (loss + weight_decay * sum((m**2).sum() for m in weights))
            total.backward()  # each probe's gradient is its own loss's: the sum passes 1 to every term
            optimiser.step()
    return [probe.eval().requires_grad_(False) for probe in probes]
