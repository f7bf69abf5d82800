"""TransUNet (Chen et al. 2021, "TransUNet: Transformers Make Strong Encoders for Medical Image
Segmentation", arXiv:2102.04306): a CNN encoder whose deepest features become tokens for a Vision
Transformer, then a cascaded up-sampler (CUP) with skip connections. 2D.

As published (R50-ViT hybrid, scaled by the plan for CPU): a ResNet-style encoder (7x7 stride-2 root,
then residual stages that halve the resolution, GroupNorm as in the ViT-hybrid's ResNet), a 1x1 patch
embedding of the deepest feature map into tokens with learned position embeddings, pre-norm Transformer
layers (MONAI ``TransformerBlock``), the tokens reshaped back to a feature map, and decoder blocks that
each up-sample by 2 (bilinear), concatenate the encoder feature of that resolution when there is one, and
apply two 3x3 conv-BatchNorm-ReLU; a 3x3 segmentation head. The paper's ViT-B/16 (12 layers, 768 wide)
becomes ``vit_layers`` layers as wide as the bottleneck.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import TransformerBlock
from torch import nn


def _groups(channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


class _ResidualBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm, a (strided) shortcut, ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False),
            nn.GroupNorm(_groups(out_ch), out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False),
            nn.GroupNorm(_groups(out_ch), out_ch),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and in_ch == out_ch
            else nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.GroupNorm(_groups(out_ch), out_ch))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class _DecoderBlock(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class TransUNet(nn.Module):
    """TransUNet for ``(B, in_channels, H, W)``; returns logits ``(B, out_channels, H, W)``.

    Args:
        widths: channels of the root and of each stage, then of the tokens; ``len(widths) - 1`` halvings
            happen before the Transformer (the paper: 64, 256, 512, 1024 and 768-wide tokens at 1/16).
        vit_layers, vit_heads: Transformer depth and heads (the paper: 12 and 12).
        patch_size: the training patch ``(H, W)``; sizes the position embeddings (interpolated for other
            sizes).

    H and W must be divisible by ``2**(len(widths) - 1)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        widths: Sequence[int] = (32, 64, 128, 256, 256),
        vit_layers: int = 4,
        vit_heads: int = 4,
        patch_size: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        depth = len(widths) - 1
        self.root = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False),
            nn.GroupNorm(_groups(widths[0]), widths[0]),
            nn.ReLU(),
        )
        # stages 1 .. depth-1 halve the resolution: features at 1/4, 1/8, ..., 1/2**depth.
        self.stages = nn.ModuleList(
            nn.Sequential(_ResidualBlock(widths[i - 1], widths[i], 2), _ResidualBlock(widths[i], widths[i], 1))
            for i in range(1, depth)
        )
        hidden = widths[depth]
        self.patch_embed = nn.Conv2d(widths[depth - 1], hidden, 1)
        grid = [max(1, s // 2**depth) for s in (patch_size or (256, 256))]
        self.position = nn.Parameter(torch.zeros(1, hidden, *grid))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.transformer = nn.ModuleList(
            TransformerBlock(hidden, 4 * hidden, vit_heads, qkv_bias=True) for _ in range(vit_layers)
        )
        self.norm = nn.LayerNorm(hidden)
        decoder_widths = [widths[i] for i in reversed(range(depth))]  # 1/2**(depth-1) ... 1/1
        self.bridge = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU()
        )
        skip_widths = [widths[i] for i in reversed(range(depth - 1))] + [0]  # the last block has no skip
        blocks, channels = [], hidden
        for out_ch, skip_ch in zip(decoder_widths, skip_widths, strict=True):
            blocks.append(_DecoderBlock(channels + skip_ch, out_ch))
            channels = out_ch
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.root(x)
        skips = [x]
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        tokens = self.patch_embed(skips.pop())
        b, c, h, w = tokens.shape
        position: torch.Tensor = self.position
        if position.shape[-2:] != (h, w):
            position = F.interpolate(position, size=(h, w), mode="bilinear", align_corners=False)
        seq = (tokens + position).flatten(2).transpose(1, 2)
        for layer in self.transformer:
            seq = layer(seq)
        x = self.bridge(self.norm(seq).transpose(1, 2).reshape(b, c, h, w))
        for block in self.decoder:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            if skips:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x)
        return self.head(x)
