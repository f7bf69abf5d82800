"""SAM's lightweight mask decoder: (image embedding, prompt tokens) -> mask logits and predicted IoU.

Kirillov et al. 2023, "Segment Anything", Sec. 3 and Appendix A ("Lightweight mask decoder"); used
unchanged by MedSAM (Ma et al. 2024) and LiteMedSAM.

Learned output tokens (one IoU token, then ``num_multimask_outputs + 1`` mask tokens) are prepended to
the prompt tokens and run through the `TwoWayTransformer` together with the image embedding plus the
dense prompt embedding. The updated image tokens are upscaled 4x by two transposed convolutions to
``D / 8`` channels; each mask token is mapped by its own 3-layer MLP (a hypernetwork) to ``D / 8``
weights whose dot product with every upscaled pixel gives that mask's logits. An MLP on the IoU
token predicts each mask's IoU. Mask token 0 is the single-mask output; tokens 1..3 are the three
ambiguity-aware outputs used when ``multimask_output`` is set.

Output frame: logits on a ``4 H_emb x 4 W_emb`` grid (256 x 256 for a 64 x 64 embedding) covering the
encoder's padded input image, i.e. the input frame scaled by ``256 / S``.

Attribute names equal the official checkpoints' ``mask_decoder.*`` keys.
"""

from __future__ import annotations

import torch
from torch import nn

from medseg.models.promptable.common import MLP, ChannelLayerNorm
from medseg.models.promptable.two_way_transformer import TwoWayTransformer


def _one_if_shared(x: torch.Tensor) -> torch.Tensor:
    """Keep a single batch entry when all entries are one broadcast view (batch stride 0)."""
    return x[:1] if x.shape[0] > 1 and x.stride(0) == 0 else x


class MaskDecoder(nn.Module):
    """Predicts masks from an image embedding and prompt embeddings.

    Args:
        transformer_dim: token width D (256).
        transformer: the `TwoWayTransformer` (depth 2, 8 heads, MLP width 2048 in SAM).
        num_multimask_outputs: masks returned with ``multimask_output`` (3).
        activation: activation of the upscaling path (GELU).
        iou_head_depth: layers of the IoU MLP (3).
        iou_head_hidden_dim: hidden width of the IoU MLP (256).
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            ChannelLayerNorm(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode B prompts.

        Args:
            image_embeddings: ``(B, D, H_emb, W_emb)``, or ``(1, D, H_emb, W_emb)`` shared by all B
                prompts (a cached embedding; it is broadcast, not copied).
            image_pe: ``(1, D, H_emb, W_emb)`` from `PromptEncoder.get_dense_pe`.
            sparse_prompt_embeddings: ``(B, K, D)`` point/box tokens (K may be 0).
            dense_prompt_embeddings: ``(B, D, H_emb, W_emb)`` (or batch 1) mask-prompt embedding.
            multimask_output: return the three ambiguity-aware masks instead of the single one.

        Returns:
            ``low_res_masks (B, M, 4 H_emb, 4 W_emb)`` logits and ``iou_predictions (B, M)``, with
            M = ``num_multimask_outputs`` (3) if ``multimask_output`` else 1.
        """
        selected = slice(1, None) if multimask_output else slice(0, 1)
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, selected
        )
        return masks, iou_pred

    def tokens(self, sparse_prompt_embeddings: torch.Tensor) -> torch.Tensor:
        """The transformer's tokens ``(B, 1 + M + K, D)``: the IoU token, the M mask tokens, then the K
        prompt tokens ``(B, K, D)``."""
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        batch = sparse_prompt_embeddings.shape[0]
        return torch.cat([output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse_prompt_embeddings], dim=1)

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        mask_tokens: slice | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and IoU of the mask tokens in ``mask_tokens`` (all ``num_mask_tokens`` when None).

        Shapes as in `forward`; returns ``(B, M, 4 H_emb, 4 W_emb)`` and ``(B, M)``.
        """
        bs = sparse_prompt_embeddings.shape[0]
        if image_embeddings.shape[0] not in (1, bs):
            raise ValueError(f"image batch {image_embeddings.shape[0]} is neither 1 nor the prompt batch {bs}")
        tokens = self.tokens(sparse_prompt_embeddings)

        # Broadcast rather than copy: with a shared image and no mask prompt, src keeps batch 1.
        src = _one_if_shared(image_embeddings) + _one_if_shared(dense_prompt_embeddings)
        _, c, h, w = src.shape
        hs, image_tokens = self.transformer(src, image_pe, tokens)
        iou_token_out = hs[:, 0, :]
        chosen = slice(None) if mask_tokens is None else mask_tokens

        upscaled = self.output_upscaling(image_tokens.transpose(1, 2).reshape(bs, c, h, w))
        # Every token's hypernetwork runs (they are tiny) so that the product below has SAM's shape, and
        # hence its exact rounding; the unwanted masks are dropped afterwards.
        hyper_in = torch.stack([mlp(hs[:, 1 + i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        _, c_up, h_up, w_up = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(bs, c_up, h_up * w_up)).reshape(bs, self.num_mask_tokens, h_up, w_up)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks[:, chosen], iou_pred[:, chosen]


def build_mask_decoder() -> MaskDecoder:
    """SAM's mask decoder as in SAM ViT-B/L/H, MedSAM and LiteMedSAM (D = 256, 3 multimask outputs)."""
    return MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
