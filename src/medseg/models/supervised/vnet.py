"""V-Net (Milletari, Navab and Ahmadi 2016, "V-Net: Fully Convolutional Neural Networks for Volumetric
Medical Image Segmentation", arXiv:1606.04797), for 2D and 3D.

As published: 5x5(x5) convolutions, one to three per stage (1, 2, 3, 3, ... down; mirrored up), each stage
a residual unit (its input added to its output), down-sampling by a stride-2 convolution with a 2-wide
kernel that doubles the channels, up-sampling by a transposed convolution, PReLU non-linearities, skip
connections that concatenate the encoder's features. Deviation: an instance norm after each convolution
(the paper has none; without it training from scratch with small CPU batches is unstable). Strides per
axis come from the plan, so anisotropic data is down-sampled only along fine axes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _conv(dims: int) -> type[nn.Module]:
    return nn.Conv3d if dims == 3 else nn.Conv2d


def _norm(dims: int, channels: int) -> nn.Module:
    return (nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d)(channels, affine=True)


class _ConvUnit(nn.Sequential):
    def __init__(self, dims: int, in_ch: int, out_ch: int, kernel: int = 5) -> None:
        super().__init__(_conv(dims)(in_ch, out_ch, kernel, padding=kernel // 2), _norm(dims, out_ch), nn.PReLU(out_ch))


class _ResidualStage(nn.Module):
    """``n`` 5x5(x5) convolutions whose output is added to the stage's input (the V-Net residual unit)."""

    def __init__(self, dims: int, in_ch: int, out_ch: int, n: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[_ConvUnit(dims, in_ch if i == 0 else out_ch, out_ch) for i in range(n)])
        self.skip = nn.Identity() if in_ch == out_ch else _conv(dims)(in_ch, out_ch, 1)
        self.act = nn.PReLU(out_ch)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        out = self.convs(x)
        return self.act(out + self.skip(x if residual is None else residual))


class VNet(nn.Module):
    """V-Net for ``(B, in_channels, *spatial)`` input; returns logits ``(B, out_channels, *spatial)``.

    Args:
        dims: 2 or 3.
        strides: one stride per down-sampling step and axis (array order); its length is the depth
            (the paper: four steps of 2).
        widths: channels per stage, ``len(strides) + 1`` of them (the paper: 16, 32, 64, 128, 256).

    Spatial sizes must be divisible by the product of the strides along each axis.
    """

    def __init__(
        self, dims: int, in_channels: int, out_channels: int, strides: Sequence[Sequence[int]], widths: Sequence[int]
    ) -> None:
        super().__init__()
        conv = _conv(dims)
        up = nn.ConvTranspose3d if dims == 3 else nn.ConvTranspose2d
        widths = list(widths)
        self.stem = _ResidualStage(dims, in_channels, widths[0], 1)
        self.downs = nn.ModuleList()
        self.down_stages = nn.ModuleList()
        for i, stride in enumerate(strides):
            kernel = [2 if s > 1 else 1 for s in stride]
            self.downs.append(
                nn.Sequential(conv(widths[i], widths[i + 1], kernel, stride=list(stride)), nn.PReLU(widths[i + 1]))
            )
            self.down_stages.append(_ResidualStage(dims, widths[i + 1], widths[i + 1], min(i + 2, 3)))
        self.ups = nn.ModuleList()
        self.up_stages = nn.ModuleList()
        for i in reversed(range(len(strides))):
            kernel = [2 if s > 1 else 1 for s in strides[i]]
            upsample = up(widths[i + 1], widths[i], tuple(kernel), stride=tuple(strides[i]))  # type: ignore[arg-type]
            self.ups.append(nn.Sequential(upsample, nn.PReLU(widths[i])))
            # after concatenation with the skip: 2 * widths[i] channels in, widths[i] out.
            self.up_stages.append(_ResidualStage(dims, 2 * widths[i], widths[i], min(i + 1, 3)))
        self.head = conv(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        skips = [x]
        for down, stage in zip(self.downs, self.down_stages, strict=True):
            x = down(x)
            x = stage(x, residual=x)
            skips.append(x)
        skips.pop()
        for up, stage in zip(self.ups, self.up_stages, strict=True):
            x = up(x)
            x = stage(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)
