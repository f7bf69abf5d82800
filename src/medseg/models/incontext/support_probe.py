"""A per-task probe: a small classifier fitted, at inference, to the support set's frozen features.

Few-shot segmentation by fitting only a light head on frozen foundation-model features, the encoder never
updated: the linear/MLP probe of self-supervised feature evaluation (DINOv2, Oquab et al. 2023, linear
segmentation heads) applied to one support set, as in the "fine-tune the last layer only" few-shot
baselines (Wang et al., "Frustratingly simple few-shot object detection", ICML 2020). No weights ship:
every support set fits its own probe (a few hundred Adam steps, one to a few seconds on two CPU cores).
"""

from __future__ import annotations

from typing import cast

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

    def linear_layers(self) -> tuple[nn.Linear, nn.Linear]:
        """The hidden and the output layer."""
        return cast(nn.Linear, self.layers[0]), cast(nn.Linear, self.layers[2])


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
    """Fit one `SupportProbe` per label to the same feature locations, together: each probe ends as it would
    from its own fit with this ``seed`` (the same initial weights and batches; only float rounding differs),
    while the batches are gathered once and the labels' first layers run as one matrix product.

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
        x, y = features.detach(), targets.detach().float().clone()
        scaled = len(x) <= batch_size or x.numel() * 4 <= FLOAT32_COPY_BYTES
        if scaled:  # one float32 copy as the first layer takes it, not one per batch (an ordinary tensor, too)
            x = (x.float() if normalised else F.normalize(x.float(), dim=-1)) * FEATURE_SCALE
        labels = y.shape[1]
        template = SupportProbe(x.shape[1], hidden)  # every label starts here, as its own fit with this seed would
        first, last = template.linear_layers()
        weights1 = first.weight.detach().repeat(labels, 1).requires_grad_()  # (K H, C): the labels' hidden units
        biases1 = first.bias.detach().repeat(labels).requires_grad_()
        weights2 = last.weight.detach().repeat(labels, 1).requires_grad_()  # (K, H)
        biases2 = last.bias.detach().repeat(labels).requires_grad_()

        def logits(rows: torch.Tensor) -> torch.Tensor:  # (B, K), SupportProbe's arithmetic for every label
            if not scaled:
                rows = (rows if normalised else F.normalize(rows, dim=-1)) * FEATURE_SCALE
            hidden_units = F.gelu(F.linear(rows, weights1, biases1)).view(len(rows), labels, hidden)
            return torch.einsum("bkh,kh->bk", hidden_units, weights2) + biases2

        positive = (y > 0.5).float().mean(0).clamp(1e-3, 1 - 1e-3)
        balance = torch.where(y > 0.5, 0.5 / positive, 0.5 / (1 - positive))
        optimiser = _Adam([weights1, biases1, weights2, biases2], learning_rate)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            if len(x) > batch_size:
                index = torch.randint(len(x), (batch_size,), generator=generator)
                # index_select: several times faster than advanced indexing for a row gather
                xb, yb, wb = x.index_select(0, index).float(), y.index_select(0, index), balance.index_select(0, index)
            else:
                xb, yb, wb = x, y, balance
            loss = (F.binary_cross_entropy_with_logits(logits(xb), yb, reduction="none") * wb).mean(0).sum()
            loss = loss + weight_decay * ((weights1**2).sum() + (weights2**2).sum())
            loss.backward()
            optimiser.step()
        probes = []
        for k in range(labels):  # inside fork_rng: a new module's initialisation draws from the global RNG
            probe = SupportProbe(x.shape[1], hidden)
            first, last = probe.linear_layers()
            with torch.no_grad():
                units = slice(k * hidden, (k + 1) * hidden)
                first.weight.copy_(weights1[units])
                first.bias.copy_(biases1[units])
                last.weight.copy_(weights2[k : k + 1])
                last.bias.copy_(biases2[k : k + 1])
            probes.append(probe.eval().requires_grad_(False))
    return probes
