"""`MatchingHead`: a small CNN that turns matching cues into a mask, trained episodically (medseg's own).

The cues (`medseg.inference.feature_incontext.matching_maps`) say how much each query pixel looks like the
support's foreground: kNN and prototype logits on frozen LiteMedSAM features and a colour log-likelihood
ratio. None of them knows the task, so a head trained on some datasets applies to others; it learns how
far to trust each cue and to follow the query's own edges (its RGB frame), at ``128 x 128``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CUES = 3  # kNN logit, prototype logit, colour log-likelihood ratio
_CUE_SCALE = torch.tensor([0.25, 0.1, 0.25])  # brings each cue to about unit range


def _block(channels_in: int, channels_out: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, padding=dilation, dilation=dilation),
        nn.GroupNorm(4, channels_out),
        nn.LeakyReLU(0.01),
    )


class MatchingHead(nn.Module):
    """``(cues (B, 3, H, W), query RGB frame (B, 3, H, W)) -> foreground logit (B, 1, H, W)``; ``H, W`` even.

    A two-level encoder-decoder (``width`` channels, dilated convolutions at half resolution for context);
    its output is added to the kNN logit, so an untrained head starts from the kNN rule.
    """

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        self.width = width
        self.full = nn.Sequential(_block(CUES + 3, width), _block(width, width))
        wide = 2 * width
        self.context = nn.Sequential(_block(width, wide), _block(wide, wide, 2), _block(wide, wide, 4))
        out = nn.Conv2d(width, 1, 1)
        nn.init.zeros_(out.weight)  # zero correction: an untrained head is the kNN rule
        assert out.bias is not None
        nn.init.zeros_(out.bias)
        self.merge = nn.Sequential(_block(3 * width, width), out)

    def forward(self, cues: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        scaled = cues * _CUE_SCALE.to(cues)[None, :, None, None]
        full = self.full(torch.cat([scaled, image], 1))
        half = self.context(F.avg_pool2d(full, 2))
        up = F.interpolate(half, size=full.shape[-2:], mode="bilinear", align_corners=False)
        return cues[:, :1] + self.merge(torch.cat([full, up], 1))
