"""A per-task probe: a small classifier fitted, at inference, to the support set's frozen features.

Few-shot segmentation by fitting only a light head on frozen foundation-model features, the encoder never
updated: the linear/MLP probe of self-supervised feature evaluation (DINOv2, Oquab et al. 2023, linear
segmentation heads) applied to one support set, as in the "fine-tune the last layer only" few-shot
baselines (Wang et al., "Frustratingly simple few-shot object detection", ICML 2020). No weights ship:
every support set fits its own probe (a few hundred Adam steps, one to a few seconds on two CPU cores).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
    """Fit a `SupportProbe` to feature locations of the support set.

    Args:
        features: ``(M, C)`` float features, one row per support location (any scale: rows are normalised),
            in any float dtype (batches are fitted in float32: a large float16 set is not copied whole).
        targets: ``(M,)`` foreground fraction of each location in [0, 1] (soft targets).
        steps: Adam steps, each on ``batch_size`` locations drawn with replacement (all when fewer).
        weight_decay: L2 penalty on the weight matrices (sum of squares, added to the loss).
        seed: the initialisation and the batches (global RNG state untouched).
        normalised: the rows are already as `SupportProbe.classify` takes them (unit-length features, with any
            extra channels appended at their own scale, as `medseg.inference.volume_probe` does): not normalised.

    Returns:
        The fitted probe in eval mode. The loss is binary cross-entropy with the classes balanced (the
        locations of foreground fraction > 0.5 weigh as much in total as the others), so a small structure
        is not drowned by its background.

    Raises:
        ValueError: ``features`` and ``targets`` do not pair up, or no locations.
    """
    if features.ndim != 2 or targets.shape != features.shape[:1] or len(features) == 0:
        shapes = f"{tuple(features.shape)} and {tuple(targets.shape)}"
        raise ValueError(f"features (M, C) and targets (M,) expected, got {shapes}")
    # callers may be in inference mode (no autograd): fit on ordinary copies with autograd on
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x, y = features.detach(), targets.detach().float().clone()
        if len(x) <= batch_size:  # every step on all rows: one float32 copy (an ordinary tensor, as autograd needs)
            x = x.float().clone()
        probe = SupportProbe(x.shape[1], hidden)
        score = probe.classify if normalised else probe
        positive = (y > 0.5).float().mean().clamp(1e-3, 1 - 1e-3)
        weights = torch.where(y > 0.5, 0.5 / positive, 0.5 / (1 - positive))
        optimiser = torch.optim.Adam(probe.parameters(), lr=learning_rate)
        generator = torch.Generator().manual_seed(seed)
        matrices = [p for name, p in probe.named_parameters() if name.endswith("weight")]
        for _ in range(steps):
            if len(x) > batch_size:
                index = torch.randint(len(x), (batch_size,), generator=generator)
                xb, yb, wb = x[index].float(), y[index], weights[index]
            else:
                xb, yb, wb = x, y, weights
            loss = (F.binary_cross_entropy_with_logits(score(xb), yb, reduction="none") * wb).mean()
            loss = loss + weight_decay * sum((m**2).sum() for m in matrices)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return probe.eval().requires_grad_(False)
