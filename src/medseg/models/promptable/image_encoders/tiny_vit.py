"""TinyViT image encoder in the variant used by LiteMedSAM.

Architecture: TinyViT (Wu et al., "TinyViT: Fast Pretraining Distillation for Small Vision Transformers",
ECCV 2022) as adapted to SAM by MobileSAM (Zhang et al., "Faster Segment Anything", 2023) and shrunk by
LiteMedSAM (Ma et al., MedSAM, Nature Communications 2024; CVPR 2024 "MedSAM on Laptop" baseline).
Parameter and buffer names equal the ``image_encoder.*`` entries of the official ``lite_medsam.pth``
(with that prefix stripped), so the checkpoint loads with ``strict=True``.

LiteMedSAM's variant differs from MobileSAM's: the patch embedding is two 1x1 stride-1 convolutions (no
down-sampling), the first two patch mergings halve the resolution and the one into the last stage keeps
it, so a ``(B, 3, 256, 256)`` image gives ``(B, 256, 64, 64)`` embeddings.

Stages pass ``(B, C, H, W)`` maps; attention blocks work on channels-last ``(B, H, W, C)`` tokens in
windows zero-padded at the bottom/right. As in the reference, padded tokens are not masked: they are
normalised and attended to like any other token (the checkpoint was trained that way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medseg.models.promptable.image_encoders._common import (
    ConvBN,
    conv_gelu,
    linear_gelu,
    neck,
    window_merge,
    window_partition,
)


class PatchEmbed(nn.Module):
    """Two 1x1 conv+BN layers with a GELU between them: ``(B, C_in, H, W) -> (B, embed_dim, H, W)``."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        hidden = embed_dim // 2
        self.seq = nn.Sequential(ConvBN(in_chans, hidden), nn.GELU(), ConvBN(hidden, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W) -> (B, embed_dim, H, W)``."""
        return self.seq[2](conv_gelu(self.seq[0], x))


class MBConv(nn.Module):
    """Inverted residual block (MobileNetV2, Sandler et al. 2018): 1x1 expand, 3x3 depthwise, 1x1 project.

    ``(B, C, H, W) -> (B, C, H, W)``; GELU after each conv, the last one applied after the residual sum.
    """

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.conv3 = ConvBN(hidden, dim, bn_weight_init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        y = conv_gelu(self.conv2, conv_gelu(self.conv1, x))
        return F.gelu(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """1x1 conv, 3x3 depthwise conv with ``stride``, 1x1 conv (GELU after the first two).

    ``(B, C_in, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, kernel_size=3, stride=stride, padding=1, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W) -> (B, C_out, H', W')``."""
        return self.conv3(conv_gelu(self.conv2, conv_gelu(self.conv1, x)))


class TinyViTAttention(nn.Module):
    """Pre-norm multi-head self-attention over one window with learned relative-position biases (LeViT).

    Each head has one bias per absolute offset ``(|dy|, |dx|)`` inside a ``window x window`` window:
    ``attention_biases`` is ``(num_heads, window**2)`` and the non-persistent ``attention_bias_idxs``
    ``(N, N)``, ``N = window**2``, maps a (query, key) pair to ``|dy| * window + |dx|`` (the order in which
    the reference enumerates the offsets). The bias is gathered on every forward, so it always reflects the
    current parameter values, in train and eval mode alike. The fused ``qkv`` projection is laid out per
    head as ``[q, k, v]``.
    """

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        rows, cols = rows.flatten(), cols.flatten()
        idxs = (rows[:, None] - rows[None, :]).abs() * window + (cols[:, None] - cols[None, :]).abs()
        self.attention_bias_idxs: torch.Tensor
        self.register_buffer("attention_bias_idxs", idxs, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B', N, C) -> (B', N, C)`` with ``B'`` = batch x windows and ``N = window**2``."""
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each (B', heads, N, head_dim)
        bias = self.attention_biases[:, self.attention_bias_idxs]  # (heads, N, N)
        logits = (q * self.scale) @ k.transpose(-2, -1)  # scaling q: 1 / window**2 of the work of scaling q k^T
        attn = torch.softmax(logits.add_(bias) if not logits.requires_grad else logits + bias, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class TinyViTMlp(nn.Module):
    """Pre-norm two-layer MLP with GELU: ``(..., C) -> (..., C)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., C) -> (..., C)``."""
        return self.fc2(linear_gelu(self.fc1, self.norm(x)))


class TinyViTBlock(nn.Module):
    """Window attention (residual), depthwise ``local_conv`` (no residual), MLP (residual).

    ``(B, H, W, C) -> (B, H, W, C)``; windows are zero-padded at the bottom/right when ``window`` does not
    divide ``H`` or ``W``.
    """

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float, local_conv_size: int) -> None:
        super().__init__()
        self.window = window
        self.attn = TinyViTAttention(dim, num_heads, window)
        self.local_conv = ConvBN(dim, dim, local_conv_size, padding=local_conv_size // 2, groups=dim)
        self.mlp = TinyViTMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        _, h, w, c = x.shape
        windows, padded = window_partition(x, self.window)
        attended = self.attn(windows.reshape(-1, self.window * self.window, c))
        x = x + window_merge(attended.view(-1, self.window, self.window, c), self.window, padded, (h, w))
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class ConvStage(nn.Module):
    """``depth`` MBConv blocks then an optional `PatchMerging`: ``(B, C, H, W) -> (B, C', H', W')``."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, out_dim: int, stride: int | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = PatchMerging(dim, out_dim, stride) if stride is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C', H', W')``."""
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class AttentionStage(nn.Module):
    """``depth`` `TinyViTBlock` then an optional `PatchMerging`: ``(B, C, H, W) -> (B, C', H', W')``."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        local_conv_size: int,
        out_dim: int,
        stride: int | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, num_heads, window, mlp_ratio, local_conv_size) for _ in range(depth)
        )
        self.downsample = PatchMerging(dim, out_dim, stride) if stride is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C', H', W')``."""
        tokens = x.permute(0, 2, 3, 1)
        for block in self.blocks:
            tokens = block(tokens)
        x = tokens.permute(0, 3, 1, 2)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """TinyViT image encoder with SAM's neck; the defaults are LiteMedSAM's configuration.

    ``(B, in_chans, H, W) -> (B, out_chans, H / s, W / s)`` with ``s`` the product of ``merge_strides``
    (LiteMedSAM: ``(B, 3, 256, 256) -> (B, 256, 64, 64)``). The first stage is convolutional (MBConv,
    ``num_heads[0]`` and ``window_sizes[0]`` unused), the others use window attention. Dropout and
    stochastic depth are omitted (LiteMedSAM uses rate 0; neither has parameters).

    Args:
        img_size: the square input side the model was trained for (kept as ``self.img_size``; the
            forward accepts other sizes).
        in_chans: input channels.
        embed_dims, depths, num_heads, window_sizes: per stage.
        mlp_ratio: MLP hidden width / embedding width in attention blocks.
        mbconv_expand_ratio: hidden width / width in MBConv blocks.
        local_conv_size: kernel of the depthwise conv between attention and MLP.
        merge_strides: stride of the patch merging after each stage but the last.
        out_chans: channels of the neck (the image embedding).
    """

    def __init__(
        self,
        img_size: int = 256,
        in_chans: int = 3,
        embed_dims: tuple[int, ...] = (64, 128, 160, 320),
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (2, 4, 5, 10),
        window_sizes: tuple[int, ...] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        merge_strides: tuple[int, ...] = (2, 2, 1),
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        n = len(embed_dims)
        if not (len(depths) == len(num_heads) == len(window_sizes) == n and len(merge_strides) == n - 1):
            raise ValueError(
                "embed_dims, depths, num_heads, window_sizes need one entry per stage, merge_strides one less"
            )
        self.img_size = img_size
        self.in_chans = in_chans
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        strides: list[int | None] = [*merge_strides, None]
        out_dims = [*embed_dims[1:], embed_dims[-1]]
        layers: list[nn.Module] = [ConvStage(embed_dims[0], depths[0], mbconv_expand_ratio, out_dims[0], strides[0])]
        for i in range(1, n):
            layers.append(
                AttentionStage(
                    embed_dims[i],
                    depths[i],
                    num_heads[i],
                    window_sizes[i],
                    mlp_ratio,
                    local_conv_size,
                    out_dims[i],
                    strides[i],
                )
            )
        self.layers = nn.ModuleList(layers)
        self.neck = neck(embed_dims[-1], out_chans)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` image in ``[0, 1]`` -> ``(B, out_chans, H / s, W / s)`` embedding."""
        return self.neck(self.stage_outputs(x, len(self.layers))[-1])

    def stage_outputs(self, x: torch.Tensor, stages: int) -> list[torch.Tensor]:
        """The maps after each of the first ``stages`` stages (their patch merging included), without the neck:
        for LiteMedSAM and a ``(B, 3, S, S)`` image, ``(B, 128, S/2, S/2)``, ``(B, 160, S/4, S/4)``,
        ``(B, 320, S/4, S/4)``, ``(B, 320, S/4, S/4)``. Later stages are not run.

        Raises:
            ValueError: ``stages`` outside 1..number of stages, or not a ``(B, in_chans, H, W)`` tensor.
        """
        if not 1 <= stages <= len(self.layers):
            raise ValueError(f"stages must be 1..{len(self.layers)}, not {stages}")
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected a (B, {self.in_chans}, H, W) tensor, got shape {tuple(x.shape)}")
        x = self.patch_embed(x)
        outputs = []
        for layer in list(self.layers)[:stages]:
            x = layer(x)
            outputs.append(x)
        return outputs


def _init_weights(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) linear weights with zero biases, as in TinyViT."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
