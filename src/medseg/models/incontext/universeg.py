"""UniverSeg (Butoi et al. 2023, "UniverSeg: Universal Medical Image Segmentation", ICCV, arXiv:2304.06131).

A query image and a support set of S (image, binary mask) pairs go through a U-Net of CrossBlocks. In a
CrossBlock, every (query, support item) feature pair is concatenated and convolved (CrossConv); the query's
new features are the mean over the S interactions, each support item keeps its own interaction; then one
3x3 convolution with LeakyReLU per path. Max-pooling down, bilinear up-sampling with skip connections, a
1x1 convolution to one logit channel. S is free at inference.

Module and parameter names follow the official implementation (github.com/JJGO/UniverSeg) so that the
v1 state_dict (``universeg_v1_nf64_ss64_STA.pt``) loads unchanged: ``enc_blocks.{i}.cross.cross_conv``,
``enc_blocks.{i}.target.vmapped.conv`` (the query path is called "target" there),
``enc_blocks.{i}.support.vmapped.conv``, the same under ``dec_blocks``, and ``out_conv.conv``.
Inputs as the official model expects: 128 x 128, intensities min-max normalised to [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import einops
import torch
import torch.nn.functional as F
from torch import nn


class _ConvAct(nn.Module):
    """A 3x3 (or 1x1) convolution, then LeakyReLU unless ``activation`` is False."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, activation: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        nn.init.kaiming_normal_(self.conv.weight, nonlinearity="leaky_relu" if activation else "linear")
        nn.init.zeros_(self.conv.bias)  # type: ignore[arg-type]
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return F.leaky_relu(x, 0.01) if self.activation else x


class _PerItem(nn.Module):
    """Apply a 2D module to every item of a ``(B, S, C, H, W)`` group."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.vmapped = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        out = self.vmapped(einops.rearrange(x, "B S C H W -> (B S) C H W"))
        return einops.rearrange(out, "(B S) C H W -> B S C H W", B=b)


class _CrossConv(nn.Module):
    """Convolution of every (query, support item) pair of feature maps, concatenated along channels."""

    def __init__(self, query_channels: int, support_channels: int, out_channels: int) -> None:
        super().__init__()
        self.cross_conv = nn.Conv2d(query_channels + support_channels, out_channels, 3, padding=1)
        nn.init.kaiming_normal_(self.cross_conv.weight, nonlinearity="linear")
        nn.init.zeros_(self.cross_conv.bias)  # type: ignore[arg-type]

    def forward(self, query: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """``(B, 1, Cq, H, W)``, ``(B, S, Cs, H, W)`` -> interactions ``(B, S, C_out, H, W)``."""
        s = support.shape[1]
        pairs = torch.cat([query.expand(-1, s, -1, -1, -1), support], dim=2)
        out = self.cross_conv(einops.rearrange(pairs, "B S C H W -> (B S) C H W"))
        return einops.rearrange(out, "(B S) C H W -> B S C H W", S=s)


class CrossBlock(nn.Module):
    """CrossConv (no activation), mean over the support for the query, then a conv per path."""

    def __init__(self, query_channels: int, support_channels: int, cross_features: int, conv_features: int) -> None:
        super().__init__()
        self.cross = _CrossConv(query_channels, support_channels, cross_features)
        self.target = _PerItem(_ConvAct(cross_features, conv_features))
        self.support = _PerItem(_ConvAct(cross_features, conv_features))

    def forward(self, query: torch.Tensor, support: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 1, Cq, H, W)``, ``(B, S, Cs, H, W)`` -> ``(B, 1, conv, H, W)``, ``(B, S, conv, H, W)``."""
        interaction = self.cross(query, support)
        query = interaction.mean(dim=1, keepdim=True)
        return self.target(query), self.support(interaction)


class UniverSeg(nn.Module):
    """UniverSeg for one query at a time per batch item.

    Args:
        encoder_blocks: ``(cross_features, conv_features)`` per encoder level (v1: four of (64, 64)).
        decoder_blocks: per decoder level; default the encoder's in reverse, without the deepest.
        image_channels: channels of query and support images (v1: 1, grey).
    """

    def __init__(
        self,
        encoder_blocks: Sequence[tuple[int, int]],
        decoder_blocks: Sequence[tuple[int, int]] | None = None,
        image_channels: int = 1,
    ) -> None:
        super().__init__()
        decoder = list(decoder_blocks) if decoder_blocks is not None else list(encoder_blocks)[-2::-1]
        self.enc_blocks = nn.ModuleList()
        self.dec_blocks = nn.ModuleList()
        query_ch, support_ch = image_channels, image_channels + 1  # support items carry their mask
        skips = []
        for cross, conv in encoder_blocks:
            self.enc_blocks.append(CrossBlock(query_ch, support_ch, cross, conv))
            query_ch = support_ch = conv
            skips.append(conv)
        for (cross, conv), skip in zip(decoder, skips[-2::-1], strict=True):
            self.dec_blocks.append(CrossBlock(query_ch + skip, support_ch + skip, cross, conv))
            query_ch = support_ch = conv
        self.out_conv = _ConvAct(query_ch, 1, kernel_size=1, activation=False)

    def forward(
        self, query_image: torch.Tensor, support_images: torch.Tensor, support_labels: torch.Tensor
    ) -> torch.Tensor:
        """Logits of the query's mask.

        Args:
            query_image: ``(B, C, H, W)``.
            support_images: ``(B, S, C, H, W)``.
            support_labels: ``(B, S, 1, H, W)`` binary masks (0/1, float).

        Returns:
            ``(B, 1, H, W)`` logits (sigmoid gives the probability of the task's foreground).
            H and W must be divisible by ``2 ** (len(encoder_blocks) - 1)``.
        """
        query = query_image[:, None]
        support = torch.cat([support_images, support_labels], dim=2)
        skips = []
        for i, block in enumerate(self.enc_blocks):
            query, support = block(query, support)
            if i < len(self.enc_blocks) - 1:
                skips.append((query, support))
                query, support = _pool(query), _pool(support)
        for block in self.dec_blocks:
            query_skip, support_skip = skips.pop()
            query = torch.cat([_upsample(query), query_skip], dim=2)
            support = torch.cat([_upsample(support), support_skip], dim=2)
            query, support = block(query, support)
        return self.out_conv(query[:, 0])


def _pool(x: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    out = F.max_pool2d(einops.rearrange(x, "B S C H W -> (B S) C H W"), 2)
    return einops.rearrange(out, "(B S) C H W -> B S C H W", B=b)


def _upsample(x: torch.Tensor) -> torch.Tensor:
    # UpsamplingBilinear2d in the official model: bilinear with align_corners=True.
    b = x.shape[0]
    out = F.interpolate(
        einops.rearrange(x, "B S C H W -> (B S) C H W"), scale_factor=2, mode="bilinear", align_corners=True
    )
    return einops.rearrange(out, "(B S) C H W -> B S C H W", B=b)


def universeg_v1() -> UniverSeg:
    """The published v1 configuration: four levels of (64, 64), grey images, 128 x 128 inputs."""
    return UniverSeg([(64, 64)] * 4)
