"""SAM's ViT image encoder (``ImageEncoderViT``), e.g. ViT-B as in SAM and MedSAM.

Architecture: Segment Anything (Kirillov et al., ICCV 2023), whose encoder is the plain ViTDet backbone
(Li et al., "Exploring Plain Vision Transformer Backbones for Object Detection", ECCV 2022): a ViT
(Dosovitskiy et al., ICLR 2021) with absolute position embeddings, windowed attention in most blocks and
global attention in a few, decomposed relative position embeddings (MViTv2, Li et al., CVPR 2022) and a
convolutional neck to 256 channels. Parameter names equal the ``image_encoder.*`` entries of the official
``sam_vit_b_01ec64.pth`` and of MedSAM's ``medsam_vit_b.pth`` (with that prefix stripped), so those
checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medseg.models.promptable.image_encoders._common import neck, window_merge, window_partition


def _relative_table(table: torch.Tensor, size: int) -> torch.Tensor:
    """Embeddings ``(size, size, C)`` for every (query, key) position pair along one axis.

    ``table`` is ``(2 * size - 1, C)``, indexed by ``q - k + size - 1``.
    """
    if table.shape[0] != 2 * size - 1:
        raise ValueError(f"relative position table has {table.shape[0]} rows, expected {2 * size - 1} for size {size}")
    pos = torch.arange(size, device=table.device)
    return table[pos[:, None] - pos[None, :] + size - 1]


class ViTAttention(nn.Module):
    """Multi-head self-attention on a ``(B, H, W, C)`` grid with decomposed relative position biases.

    For query ``(qh, qw)`` and key ``(kh, kw)`` the logit gets ``q . rel_pos_h[qh - kh] + q . rel_pos_w[qw - kw]``
    (unscaled ``q``). ``rel_pos_h`` / ``rel_pos_w`` are ``(2 * size - 1, head_dim)``. The fused ``qkv``
    projection is laid out as ``[q (all heads), k, v]``.
    """

    def __init__(self, dim: int, num_heads: int, size: tuple[int, int], qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * size[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        b, h, w, c = x.shape
        qkv = self.qkv(x).view(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        grid_q = q.reshape(b, self.num_heads, h, w, -1)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, _relative_table(self.rel_pos_h, h))
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, _relative_table(self.rel_pos_w, w))
        logits = ((q * self.scale) @ k.transpose(-2, -1)).view(b, self.num_heads, h, w, h, w)
        logits = logits + rel_h[..., :, None] + rel_w[..., None, :]
        attn = torch.softmax(logits.view(b, self.num_heads, h * w, h * w), dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, h, w, c))


class MLPBlock(nn.Module):
    """Two-layer MLP with GELU: ``(..., C) -> (..., C)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., C) -> (..., C)``."""
        return self.lin2(F.gelu(self.lin1(x)))


class ViTBlock(nn.Module):
    """Pre-norm transformer block; window attention when ``window > 0``, else global over ``grid``.

    ``(B, H, W, C) -> (B, H, W, C)``; windows are zero-padded at the bottom/right after ``norm1``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ViTAttention(dim, num_heads, (window, window) if window > 0 else grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        y = self.norm1(x)
        if self.window > 0:
            h, w = y.shape[1], y.shape[2]
            windows, padded = window_partition(y, self.window)
            y = window_merge(self.attn(windows), self.window, padded, (h, w))
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: ``(B, C_in, H, W) -> (B, H / p, W / p, embed_dim)`` (channels-last)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W) -> (B, H / p, W / p, embed_dim)``."""
        return self.proj(x).permute(0, 2, 3, 1)


class ImageEncoderViT(nn.Module):
    """SAM's ViT image encoder: ``(B, in_chans, img_size, img_size) -> (B, out_chans, img_size / p, img_size / p)``.

    ViT-B (``build_vit_b``): ``(B, 3, 1024, 1024) -> (B, 256, 64, 64)``. The input is expected normalised
    and padded to ``img_size`` (the absolute ``pos_embed`` ``(1, img_size / p, img_size / p, embed_dim)``
    fixes the grid). Relative position tables are ``(2 * window - 1, head_dim)`` in windowed blocks and
    ``(2 * img_size / p - 1, head_dim)`` in the ``global_attn_indexes`` blocks. LayerNorms use eps 1e-6.
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11),
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.in_chans = in_chans
        grid = (img_size // patch_size, img_size // patch_size)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, *grid, embed_dim))
        self.blocks = nn.ModuleList(
            ViTBlock(embed_dim, num_heads, mlp_ratio, 0 if i in global_attn_indexes else window_size, grid)
            for i in range(depth)
        )
        self.neck = neck(embed_dim, out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, img_size, img_size) -> (B, out_chans, img_size / p, img_size / p)``."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected a (B, {self.in_chans}, H, W) tensor, got shape {tuple(x.shape)}")
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))
