"""GenSeg's mask-to-image generator and its PatchGAN discriminator, in 2D and 3D.

Sources: pix2pix (Isola et al., CVPR 2017: a U-Net generator, a 70x70 PatchGAN discriminator, GAN loss
plus 100 x L1) as GenSeg uses it (Zhang, Xie et al., Nature Communications 2025), whose generator's
up-convolutions are softmax-weighted mixtures of 4, 6 and 8 wide transposed convolutions: the mixture
weights are the *architecture* parameters that GenSeg tunes on the segmentation model's validation loss.

Sized for a CPU: ``ngf`` channels at the first level (pix2pix's ``unet_256`` uses 64, eight levels); the
number of levels and their strides follow the segmentation plan (``strides``, one entry per level and
axis), so the generator fits the plan's patch in 2D and 3D. Instance normalisation replaces batch
normalisation (batches of one or two).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

UP_KERNELS = (4, 6, 8)  # GenSeg's candidate widths of the up-convolutions along a halved axis


def _conv(dims: int) -> Any:  # the class (its per-dimension tuple types defeat a static check)
    return nn.Conv2d if dims == 2 else nn.Conv3d


def _norm(dims: int, channels: int) -> nn.Module:
    return (nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d)(channels, affine=True)


def _down_kernel(stride: list[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """pix2pix's 4-wide stride-2 convolution along halved axes, 3-wide stride-1 along the others."""
    return tuple(4 if s == 2 else 3 for s in stride), tuple(1 for _ in stride)


class MixedUpConv(nn.Module):
    """``sum_k softmax(alpha)_k * ConvTranspose_k(x)`` over the kernel widths `UP_KERNELS`; every candidate
    doubles the axes whose stride is 2 exactly (padding ``(k - 2) / 2``) and keeps the others (width 3).

    ``(B, C_in, *S) -> (B, C_out, *S * stride)``. ``alpha`` (3,) is an architecture parameter.
    """

    def __init__(self, dims: int, in_channels: int, out_channels: int, stride: list[int]) -> None:
        super().__init__()
        transpose: Any = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
        self.candidates = nn.ModuleList()
        for k in UP_KERNELS:
            kernel = tuple(k if s == 2 else 3 for s in stride)
            padding = tuple((k - 2) // 2 if s == 2 else 1 for s in stride)
            self.candidates.append(transpose(in_channels, out_channels, kernel, tuple(stride), padding, bias=False))
        self.alpha = nn.Parameter(torch.zeros(len(UP_KERNELS)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.alpha, 0)
        return sum((w * conv(x) for w, conv in zip(weights, self.candidates, strict=True)), torch.zeros(()))


class MaskToImageGenerator(nn.Module):
    """A U-Net from a one-hot label map ``(B, K, *S)`` to an image ``(B, C, *S)`` (the plan's normalised
    intensities, no output squashing), with `MixedUpConv` up-sampling and pix2pix's dropout as its noise.

    Args:
        dims: 2 or 3.
        classes: K, label values including background.
        channels: C, image channels.
        strides: one stride list per level (2 halves that axis, 1 keeps it), e.g. a plan's network strides.
        ngf: channels at the first level (doubling per level, capped at ``4 * ngf``: a CPU's budget).
        dropout: on the three deepest decoder levels (pix2pix: 0.5).
    """

    def __init__(
        self, dims: int, classes: int, channels: int, strides: list[list[int]], ngf: int = 32, dropout: float = 0.5
    ) -> None:
        super().__init__()
        if dims not in (2, 3) or not strides:
            raise ValueError("dims must be 2 or 3 and strides non-empty")
        conv = _conv(dims)
        widths = [min(ngf * 2**i, ngf * 4) for i in range(len(strides) + 1)]
        self.stem = conv(classes, widths[0], 3, 1, 1)
        self.down = nn.ModuleList()
        for i, stride in enumerate(strides):
            kernel, padding = _down_kernel(stride)
            self.down.append(
                nn.Sequential(
                    nn.LeakyReLU(0.2),
                    conv(widths[i], widths[i + 1], kernel, tuple(stride), padding, bias=False),
                    _norm(dims, widths[i + 1]),
                )
            )
        self.up = nn.ModuleList()
        deepest = len(strides) - 1
        for i in reversed(range(len(strides))):
            in_width = widths[i + 1] * (1 if i == deepest else 2)
            up = MixedUpConv(dims, in_width, widths[i], strides[i])
            layers: list[nn.Module] = [nn.ReLU(), up, _norm(dims, widths[i])]
            if dropout and i >= deepest - 2 and i > 0:
                layers.append(nn.Dropout(dropout))
            self.up.append(nn.Sequential(*layers))
        self.head = nn.Sequential(nn.ReLU(), conv(widths[0] * 2, channels, 3, 1, 1))

    def forward(self, onehot: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(onehot)]
        for layer in self.down:
            skips.append(layer(skips[-1]))
        x = skips.pop()
        for layer in self.up:
            x = torch.cat([layer(x), skips.pop()], 1)
        return self.head(x)

    def architecture_parameters(self) -> list[nn.Parameter]:
        """The up-convolutions' mixture weights (tuned on the validation loss)."""
        return [m.alpha for m in self.modules() if isinstance(m, MixedUpConv)]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every other parameter (tuned on the GAN and L1 losses)."""
        arch = {id(p) for p in self.architecture_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def kernel_weights(self) -> list[list[float]]:
        """``softmax(alpha)`` of each up-convolution, deepest first: which kernel widths GenSeg chose."""
        return [[round(float(w), 4) for w in torch.softmax(a.detach(), 0)] for a in self.architecture_parameters()]


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN (``n_layers`` 3: 70x70 receptive field in 2D): ``(B, K + C, *S)`` label map and
    image together -> ``(B, 1, *S')`` real/fake logits per patch. Strides follow the plan's first levels."""

    def __init__(self, dims: int, in_channels: int, strides: list[list[int]], ndf: int = 32, n_layers: int = 3) -> None:
        super().__init__()
        conv = _conv(dims)
        used = strides[:n_layers]
        layers: list[nn.Module] = []
        width = in_channels
        for i, stride in enumerate(used):
            out = min(ndf * 2**i, ndf * 8)
            kernel, padding = _down_kernel(stride)
            layers.append(conv(width, out, kernel, tuple(stride), padding, bias=i == 0))
            if i:
                layers.append(_norm(dims, out))
            layers.append(nn.LeakyReLU(0.2))
            width = out
        out = min(ndf * 2 ** len(used), ndf * 8)
        layers += [conv(width, out, 3, 1, 1, bias=False), _norm(dims, out), nn.LeakyReLU(0.2), conv(out, 1, 3, 1, 1)]
        self.model = nn.Sequential(*layers)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        return self.model(pair)


def gan_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """pix2pix's vanilla GAN loss: binary cross-entropy of every patch's logit against real (1) or fake (0)."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 1.0 if real else 0.0))
