"""Small building blocks shared by SAM's prompt encoder, two-way transformer and mask decoder.

Kirillov et al. 2023, "Segment Anything" (SAM). Parameter names (``lin1``/``lin2``, ``layers.i``,
``weight``/``bias``) equal those of the official checkpoints so their state_dicts load unchanged.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn
from torch.nn import functional as F


class ChannelLayerNorm(nn.Module):
    """Layer normalisation over the channel axis of a channels-first map (SAM's ``LayerNorm2d``).

    Each pixel's ``C`` values are normalised to zero mean and unit (biased) variance, then scaled and
    shifted per channel: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(dim=1, keepdim=True)
        variance = centred.square().mean(dim=1, keepdim=True)
        normalised = centred / torch.sqrt(variance + self.eps)
        return normalised * self.weight[:, None, None] + self.bias[:, None, None]


class FeedForward(nn.Module):
    """Two-layer position-wise MLP of a transformer block: ``(..., D) -> (..., D)`` via width ``hidden``."""

    def __init__(self, dim: int, hidden: int, activation: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """``depth`` linear layers with ReLU between them (none after the last): ``(..., in) -> (..., out)``.

    Used for the mask decoder's hypernetworks and its IoU head.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, depth: int, sigmoid_output: bool = False) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"an MLP needs at least one layer, got depth={depth}")
        widths = [in_dim] + [hidden_dim] * (depth - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(widths))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x
