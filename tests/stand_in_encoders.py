"""A transparent stand-in for the LiteMedSAM image encoder in the in-context tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PooledIntensity(nn.Module):
    """``(B, 3, S, S) -> (B, 4, S/4, S/4)``: mean intensity, its complement, a constant and the squared
    intensity; `stage_outputs` gives TinyViT's three stage shapes (``/2``, ``/4``, ``/4``) of the same cues.
    Counts the images it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.images_seen = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.images_seen += len(images)
        grey = F.avg_pool2d(images.mean(1, keepdim=True), 4)
        return torch.cat([grey, 1 - grey, torch.full_like(grey, 0.1), grey**2], 1)

    def stage_outputs(self, images: torch.Tensor, stages: int) -> list[torch.Tensor]:
        self.images_seen += len(images)
        fine, coarse = (F.avg_pool2d(images.mean(1, keepdim=True), f) for f in (2, 4))
        cues = [torch.cat([g, 1 - g, torch.full_like(g, 0.1)], 1) for g in (fine, coarse)]
        return [*cues, torch.cat([coarse**2, torch.full_like(coarse, 0.1)], 1)][:stages]
