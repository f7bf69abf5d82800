"""SAM's prompt encoder: points and boxes -> sparse tokens, a mask -> a dense map.

Kirillov et al. 2023, "Segment Anything", Sec. 3 and Appendix A ("Prompt encoder"); used unchanged by
MedSAM (Ma et al. 2024) and LiteMedSAM.

Coordinate frame: points and boxes are ``(x, y)`` pixels of the encoder's input image (the resized
and padded ``S x S`` image, S = 1024 for SAM/MedSAM ViT-B, 256 for LiteMedSAM). Every coordinate is
shifted by +0.5 to the pixel centre, divided by the image width (x) or height (y) and encoded with
random Fourier features (Tancik et al. 2020): ``[sin(2 pi v), cos(2 pi v)]`` with
``v = (2 u - 1) @ G`` for a fixed Gaussian matrix ``G`` of shape ``(2, D / 2)``.

Sparse tokens: a point gets its encoding plus a learned embedding for its label (``point_embeddings.0``
negative, ``.1`` positive); a padding point (label -1) is replaced by ``not_a_point_embed``; a box is
two tokens, its top-left and bottom-right corners, plus ``point_embeddings.2`` / ``.3``. When points
come without a box, one padding point is appended (as SAM does). Dense map: a mask prompt (logits at
4x the embedding resolution) is downscaled by two stride-2 convolutions and a 1x1 convolution;
without one, the learned ``no_mask_embed`` is broadcast over the grid.

Attribute names equal the official checkpoints' ``prompt_encoder.*`` keys.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

from medseg.models.promptable.common import ChannelLayerNorm

EMBED_DIM = 256


class RandomFourierPositionEncoding(nn.Module):
    """Positional encoding of normalised ``(x, y)`` coordinates with random spatial frequencies.

    The frequency matrix is the buffer ``positional_encoding_gaussian_matrix`` ``(2, num_pos_feats)``
    (drawn from N(0, scale^2) at construction, replaced by the checkpoint's). Output width is
    ``2 * num_pos_feats``.
    """

    positional_encoding_gaussian_matrix: torch.Tensor

    def __init__(self, num_pos_feats: int = 128, scale: float | None = None) -> None:
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats))

    def encode(self, unit_xy: torch.Tensor) -> torch.Tensor:
        """``(..., 2)`` coordinates in ``[0, 1]`` (x then y) -> ``(..., 2 * num_pos_feats)``."""
        phase = math.tau * ((2.0 * unit_xy - 1.0) @ self.positional_encoding_gaussian_matrix)
        return torch.cat([torch.sin(phase), torch.cos(phase)], dim=-1)

    def encode_pixels(self, xy: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """``(B, N, 2)`` ``(x, y)`` positions in an ``image_size = (H, W)`` frame -> ``(B, N, C)``."""
        h, w = image_size
        scale = xy.new_tensor([w, h], dtype=self.positional_encoding_gaussian_matrix.dtype)
        return self.encode(xy.to(scale.dtype) / scale)

    def grid(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of every cell centre of an ``(H, W)`` grid: ``(C, H, W)``."""
        h, w = size
        matrix = self.positional_encoding_gaussian_matrix
        ys = (torch.arange(h, device=matrix.device, dtype=matrix.dtype) + 0.5) / h
        xs = (torch.arange(w, device=matrix.device, dtype=matrix.dtype) + 0.5) / w
        xy = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w)], dim=-1)  # (H, W, 2)
        return self.encode(xy).permute(2, 0, 1)


class PromptEncoder(nn.Module):
    """Embeds SAM prompts for the mask decoder.

    Args:
        embed_dim: token width D (256).
        image_embedding_size: ``(H_emb, W_emb)`` of the image embedding (64, 64).
        input_image_size: ``(H, W)`` of the encoder input in pixels, the frame of point/box coordinates.
        mask_in_chans: hidden channels of the mask downscaler (16).
        activation: activation of the mask downscaler (GELU).
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = RandomFourierPositionEncoding(embed_dim // 2)
        # 0: negative point, 1: positive point, 2: box top-left corner, 3: box bottom-right corner.
        self.num_point_embeddings = 4
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        quarter = mask_in_chans // 4
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, quarter, kernel_size=2, stride=2),
            ChannelLayerNorm(quarter),
            activation(),
            nn.Conv2d(quarter, mask_in_chans, kernel_size=2, stride=2),
            ChannelLayerNorm(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid, ``(1, D, H_emb, W_emb)``.

        Cell ``(i, j)`` is encoded at ``((j + 0.5) / W_emb, (i + 0.5) / H_emb)``, the same normalised
        frame as the point prompts.
        """
        return self.pe_layer.grid(self.image_embedding_size).unsqueeze(0)

    def _point_weight(self, index: int) -> torch.Tensor:
        """``(1, D)`` learned embedding ``point_embeddings[index]``."""
        return cast(nn.Embedding, self.point_embeddings[index]).weight

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """``(B, N, 2)`` xy pixels and ``(B, N)`` labels -> ``(B, N + pad, D)`` tokens."""
        coords = coords + 0.5
        if pad:
            coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        encoded = self.pe_layer.encode_pixels(coords, self.input_image_size)
        label = labels[..., None]
        zero = encoded.new_zeros(())
        with_label = encoded + torch.where(
            label == 1,
            self._point_weight(1),
            torch.where(label == 0, self._point_weight(0), zero),
        )
        return torch.where(label == -1, self.not_a_point_embed.weight.to(encoded.dtype), with_label)

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """``(B, 4)`` or ``(B, 1, 4)`` boxes ``x0, y0, x1, y1`` in pixels -> ``(B, 2, D)`` corner tokens."""
        if boxes.shape[-1] != 4 or boxes.numel() != 4 * boxes.shape[0]:
            raise ValueError(f"expected one box per prompt, (B, 4) or (B, 1, 4), got {tuple(boxes.shape)}")
        corners = (boxes + 0.5).reshape(boxes.shape[0], 2, 2)
        encoded = self.pe_layer.encode_pixels(corners, self.input_image_size)
        corner_embed = torch.cat([self._point_weight(2), self._point_weight(3)], dim=0)
        return encoded + corner_embed

    def _batch_size(
        self, points: tuple[torch.Tensor, torch.Tensor] | None, boxes: torch.Tensor | None, masks: torch.Tensor | None
    ) -> int:
        for prompt in (None if points is None else points[0], boxes, masks):
            if prompt is not None:
                return int(prompt.shape[0])
        return 1

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed a batch of B prompts (any combination of points, one box and one mask per prompt).

        Args:
            points: coordinates ``(B, N, 2)`` as ``(x, y)`` input-image pixels and labels ``(B, N)``:
                1 positive, 0 negative, -1 padding (ignored).
            boxes: ``(B, 4)`` or ``(B, 1, 4)`` as ``x0, y0, x1, y1`` input-image pixels.
            masks: ``(B, 1, 4 * H_emb, 4 * W_emb)`` mask logits (e.g. a previous low-res prediction).

        Returns:
            ``sparse (B, K, D)`` with K = N (+1 padding point when there is no box) + 2 per box, points
            first; ``dense (B, D, H_emb, W_emb)`` (without a mask, an expanded view of ``no_mask_embed``).
        """
        bs = self._batch_size(points, boxes, masks)
        weight = self.no_mask_embed.weight
        tokens: list[torch.Tensor] = [weight.new_empty(bs, 0, self.embed_dim)]
        if points is not None:
            coords, labels = points
            tokens.append(self._embed_points(coords, labels, pad=boxes is None))
        if boxes is not None:
            tokens.append(self._embed_boxes(boxes))
        sparse = torch.cat(tokens, dim=1)

        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            h, w = self.image_embedding_size
            dense = weight.reshape(1, -1, 1, 1).expand(bs, -1, h, w)
        return sparse, dense


def build_prompt_encoder(input_image_size: int, embed_size: int = 64) -> PromptEncoder:
    """SAM's prompt encoder for a square ``input_image_size`` input and ``embed_size`` grid.

    256 for LiteMedSAM, 1024 for SAM / MedSAM ViT-B; ``embed_size`` 64 in all three (mask prompts
    are then ``4 * 64 = 256`` pixels square).
    """
    return PromptEncoder(
        embed_dim=EMBED_DIM,
        image_embedding_size=(embed_size, embed_size),
        input_image_size=(input_image_size, input_image_size),
        mask_in_chans=16,
    )
