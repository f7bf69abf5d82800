"""Layers shared by the SAM-family image encoders: channel LayerNorm, conv + BatchNorm, window partitioning."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from medseg.models.promptable.common import ChannelLayerNorm


def neck(in_channels: int, out_channels: int = 256) -> nn.Sequential:
    """SAM's encoder neck: 1x1 conv -> channel LayerNorm -> 3x3 conv -> channel LayerNorm, convs without bias.

    ``(B, in_channels, H, W) -> (B, out_channels, H, W)``; submodules are named ``0`` to ``3`` as in the
    official checkpoints (``neck.0.weight`` ... ``neck.3.bias``).
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
        ChannelLayerNorm(out_channels),
        nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
        ChannelLayerNorm(out_channels),
    )


class ConvBN(nn.Sequential):
    """Bias-free ``Conv2d`` (submodule ``c``) followed by ``BatchNorm2d`` (submodule ``bn``).

    ``(B, C_in, H, W) -> (B, C_out, H', W')``. ``bn_weight_init`` sets the initial BatchNorm scale (0 makes
    a residual branch start as the identity).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.c = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)


def conv_gelu(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``GELU(conv(x))`` (exact, erf-based), in one oneDNN call where ``conv`` is a plain ``Conv2d`` with
    frozen weights and ``x`` a float32 CPU tensor (as in `for_inference` copies).

    The fused call saves a pass over the convolution's output, which dominates at high resolution
    (TinyViT's first stage); it computes the same values up to float32 rounding. Anything else (a
    `ConvBN` in training, autograd, another device or dtype) takes the unfused path.
    """
    if (
        type(conv) is nn.Conv2d
        and _FUSED_CONV is not None
        and _fusable(conv, x)
        and isinstance(conv.padding, tuple)
        and conv.padding_mode == "zeros"
    ):
        return _FUSED_CONV(
            x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups, "gelu", [], "none"
        )
    return F.gelu(conv(x))


def linear_gelu(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``GELU(linear(x))`` (exact), fused in one oneDNN call under the conditions of `conv_gelu`."""
    if type(linear) is nn.Linear and _FUSED_LINEAR is not None and _fusable(linear, x):
        return _FUSED_LINEAR(x, linear.weight, linear.bias, "gelu", [], "none")
    return F.gelu(linear(x))


def _fusable(layer: nn.Module, x: torch.Tensor) -> bool:
    # plain layers only: a subclass or wrapper, a hook or autocast must see the layer run as a module
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not (x.requires_grad or any(p.requires_grad for p in layer.parameters(recurse=False)))
        and not (layer._forward_hooks or layer._forward_pre_hooks)
        and not torch.is_autocast_enabled("cpu")
    )


def _fused_op(name: str) -> Callable[..., torch.Tensor] | None:
    """oneDNN's convolution / linear with a fused element-wise op (the ops TorchInductor emits on CPU), where
    this build has them."""
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(torch.ops.mkldnn, name, None)


_FUSED_CONV = _fused_op("_convolution_pointwise")
_FUSED_LINEAR = _fused_op("_linear_pointwise")


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Split channels-last tokens into non-overlapping square windows, zero-padding bottom/right.

    Args:
        x: ``(B, H, W, C)``.
        window: window side in tokens.

    Returns:
        ``(windows, (Hp, Wp))``: ``windows`` is ``(B * nH * nW, window, window, C)`` ordered batch-major,
        then window row, then window column; ``(Hp, Wp)`` is the padded size (multiples of ``window``).
    """
    b, h, w, c = x.shape
    pad_h = -h % window
    pad_w = -w % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c).transpose(2, 3)
    return x.reshape(-1, window, window, c), (hp, wp)


def window_merge(windows: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Inverse of `window_partition`: ``(B * nH * nW, window, window, C) -> (B, H, W, C)``, padding cropped."""
    hp, wp = padded
    h, w = size
    c = windows.shape[-1]
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.view(b, hp // window, wp // window, window, window, c).transpose(2, 3).reshape(b, hp, wp, c)
    if hp != h or wp != w:
        x = x[:, :h, :w].contiguous()
    return x


def for_inference(encoder: nn.Module) -> nn.Module:
    """A frozen copy of ``encoder`` that computes the same embedding faster on CPU.

    Every `ConvBN` becomes one convolution with the BatchNorm's running statistics folded into its
    weight and bias (exact in eval mode), and weights are stored channels-last, the layout oneDNN's
    convolutions run fastest in (about 1.6x for LiteMedSAM's TinyViT with 2 threads). The copy
    holds the weights as they are now: later changes to ``encoder`` do not reach it.
    """
    frozen = copy.deepcopy(encoder).eval()
    for module in list(frozen.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, ConvBN):
                setattr(module, name, fuse_conv_bn_eval(child.c, child.bn))
    frozen.requires_grad_(False)
    for parameter in frozen.parameters():
        if parameter.ndim == 4:
            parameter.data = parameter.data.contiguous(memory_format=torch.channels_last)
    return frozen
