"""SAM's two-way transformer: prompt tokens and image tokens update each other.

Kirillov et al. 2023, "Segment Anything", Sec. 3 and Appendix A ("Lightweight mask decoder"). Each
block does (1) self-attention of the tokens, (2) token-to-image cross-attention, (3) an MLP on the
tokens and (4) image-to-token cross-attention; a last token-to-image attention and LayerNorm follow.
Positional encodings are added to queries and keys of every attention (never to values); the first
block's self-attention uses none, because the tokens then still equal their positional embedding.
Cross-attentions project to half the width (``attention_downsample_rate=2``) to save compute.

Batching: the tokens carry B prompts. The image tokens may have batch B or batch 1 (one image
embedding shared by all prompts); a batch-1 image is broadcast, so the image-side projections of the
first block are computed once instead of B times. After the first block the image tokens differ per
prompt and have batch B.

Attribute names equal the official checkpoints' ``mask_decoder.transformer.*`` keys.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from medseg.models.promptable.common import FeedForward


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(..., N, h * c) -> (..., h, N, c)``."""
    *lead, n, width = x.shape
    return x.reshape(*lead, n, heads, width // heads).transpose(-3, -2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(B, h, N, c) -> (B, N, h * c)``."""
    b, h, n, c = x.shape
    return x.transpose(1, 2).reshape(b, n, h * c)


class Attention(nn.Module):
    """Multi-head scaled dot-product attention with an optionally narrower internal width.

    ``q``: ``(Bq, Nq, D)``; ``k``, ``v``: ``(Bk, Nk, D)``; batch sizes must broadcast (equal, or one of
    them 1). Returns ``(max(Bq, Bk), Nq, D)``. Inputs are projected to ``D // downsample_rate`` channels
    split over ``num_heads`` heads, and the result is projected back to ``D``.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads != 0:
            raise ValueError(f"{num_heads} heads do not divide the internal width {self.internal_dim}")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        query = split_heads(self.q_proj(q), self.num_heads)
        key = split_heads(self.k_proj(k), self.num_heads)
        value = split_heads(self.v_proj(v), self.num_heads)
        logits = (query @ key.transpose(-2, -1)) / math.sqrt(query.shape[-1])
        mixed = torch.softmax(logits, dim=-1) @ value  # (B, heads, Nq, C / heads)
        return self.out_proj(merge_heads(mixed))


class TwoWayAttentionBlock(nn.Module):
    """One block of the two-way transformer (post-norm residual sub-layers, see module docstring).

    ``forward(queries (B, N, D), keys (B or 1, HW, D), query_pe (B, N, D), key_pe (1 or B, HW, D))``
    returns the updated ``(queries (B, N, D), keys (B, HW, D))``.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = FeedForward(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def attend_tokens(self, queries: torch.Tensor, query_pe: torch.Tensor) -> torch.Tensor:
        """Sub-layer (1), the tokens' self-attention: ``(B, N, D) -> (B, N, D)``."""
        if self.skip_first_layer_pe:
            # First block: no positional term and no residual (SAM replaces the tokens here).
            return self.norm1(self.self_attn(q=queries, k=queries, v=queries))
        with_pe = queries + query_pe
        return self.norm1(queries + self.self_attn(q=with_pe, k=with_pe, v=queries))

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        queries = self.attend_tokens(queries, query_pe)
        keys_with_pe = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q=queries + query_pe, k=keys_with_pe, v=keys))
        queries = self.norm3(queries + self.mlp(queries))

        image_update = self.cross_attn_image_to_token(q=keys_with_pe, k=queries + query_pe, v=queries)
        keys = self.norm4(keys + image_update)
        return queries, keys


class TwoWayTransformer(nn.Module):
    """Stack of `TwoWayAttentionBlock` plus a final token-to-image attention (SAM mask decoder).

    Args:
        depth: number of blocks (2 in SAM).
        embedding_dim: token width D (256).
        num_heads: attention heads (8).
        mlp_dim: hidden width of the token MLP (2048).
        activation: MLP activation (ReLU in SAM).
        attention_downsample_rate: cross-attention width divisor (2).
    """

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                activation=activation,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the transformer.

        Args:
            image_embedding: ``(B or 1, D, H, W)`` image tokens (a batch of 1 is shared by all prompts).
            image_pe: ``(1 or B, D, H, W)`` positional encoding of the image grid.
            point_embedding: ``(B, N, D)`` output and prompt tokens; also their positional term.

        Returns:
            ``(tokens (B, N, D), image_tokens (B, H*W, D))``; image tokens are in row-major ``(y, x)``
            order of the ``H x W`` grid.
        """
        if image_embedding.shape[0] not in (1, point_embedding.shape[0]):
            raise ValueError(
                f"image batch {image_embedding.shape[0]} is neither 1 nor the prompt batch {point_embedding.shape[0]}"
            )
        keys = image_embedding.flatten(2).transpose(1, 2)  # (B or 1, HW, D)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding, key_pe=key_pe)
        if keys.shape[0] != queries.shape[0]:  # depth 0 with a shared image
            keys = keys.expand(queries.shape[0], -1, -1)
        update = self.final_attn_token_to_image(q=queries + point_embedding, k=keys + key_pe, v=keys)
        queries = self.norm_final_attn(queries + update)
        return queries, keys
