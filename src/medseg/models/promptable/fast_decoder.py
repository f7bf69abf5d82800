"""Inference-only mask decoding for one cached image embedding, reordered for CPU speed.

Computes the same function as `PromptableSegmenter.decode` (SAM's prompt encoder, two-way transformer
and mask decoder; Kirillov et al. 2023, "Segment Anything", Appendix A) in a cheaper order:

1. Per image, once: the image tokens plus the no-mask embedding, the dense positional encoding, and
   the first block's image-side projections (its keys, values and image queries) do not depend on
   the prompt, so they are computed when the image is set, not for every click.
2. Per prompt: a cross-attention between N prompt tokens and the H*W (4096) image tokens need not
   project the image tokens at all. With ``Q_h`` the projected prompt tokens of head h,
   ``softmax(Q_h (X W_k,h)^T) (X W_v,h)`` equals ``(softmax((Q_h W_k,h) X^T) X) W_v,h`` (the key
   bias only shifts a softmax row, and attention rows sum to one, so the value bias passes through),
   and the image-to-token direction folds the query and output projections into the N tokens the
   same way. Every product over the image tokens then has heads x N (56 for a box) columns instead
   of the 128 of the projections; with 16 or more tokens the plain order is cheaper and is used.
3. The two transposed convolutions of the upscaling path (kernel 2, stride 2) are one matrix product
   each on channels-last pixels, and only the requested masks meet their hypernetwork weights.

The object holds no per-call state, so one decoder may serve several threads.

Logits equal `decode`'s up to float32 rounding (tested: max |difference| below 1e-3 on logits of
magnitude ~10). Training keeps using the modules themselves; this path has no autograd.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from torch.nn import functional as F

from medseg.models.promptable.common import ChannelLayerNorm
from medseg.models.promptable.two_way_transformer import Attention, TwoWayAttentionBlock, merge_heads, split_heads

if TYPE_CHECKING:  # the segmenter builds these decoders
    from medseg.models.promptable.segmenter import PromptableSegmenter


class CachedImageDecoder:
    """Decode prompts against one image embedding, many times, fast.

    Args:
        model: the segmenter whose prompt encoder and mask decoder are used (weights are read at
            call time, so it must not be trained while this object is in use).
        embedding: ``(1, D, H, W)`` image embedding from ``model.embed_image`` (D = 256, H = W = 64).

    Memory: about 7 x H x W x D floats (14 MB for a 64 x 64 x 256 embedding).
    """

    def __init__(self, model: PromptableSegmenter, embedding: torch.Tensor) -> None:
        if embedding.ndim != 4 or embedding.shape[0] != 1:
            raise ValueError(f"expected one (1, D, H, W) embedding, got {tuple(embedding.shape)}")
        self.model = model
        self.embedding = embedding
        decoder = model.mask_decoder
        self._layers = cast(list[TwoWayAttentionBlock], list(decoder.transformer.layers))
        _, dim, height, width = embedding.shape
        self.grid = (height, width)
        with torch.inference_mode():
            self._image = embedding[0].flatten(1).t().contiguous()  # (HW, D), row-major (y, x)
            self._pe = model.prompt_encoder.get_dense_pe()[0].flatten(1).t().contiguous()
            keys = self._image + model.prompt_encoder.no_mask_embed.weight  # src without a mask prompt
            keys_with_pe = keys + self._pe
            self._keys = keys
            if self._layers:
                first = self._layers[0]
                token_to_image, image_to_token = first.cross_attn_token_to_image, first.cross_attn_image_to_token
                heads = token_to_image.num_heads
                self._first_keys = split_heads(token_to_image.k_proj(keys_with_pe), heads).contiguous()
                self._first_values = split_heads(token_to_image.v_proj(keys), heads).contiguous()
                image_queries = split_heads(image_to_token.q_proj(keys_with_pe), image_to_token.num_heads)
                self._first_image_queries = image_queries.transpose(-2, -1).contiguous()  # (h, c, HW)
            conv1, norm, self._act1, conv2, self._act2 = decoder.output_upscaling
            self._norm = cast(ChannelLayerNorm, norm)
            # ConvTranspose2d (kernel 2, stride 2) weight (in, out, 2, 2) -> (in, 2 * 2 * out), columns
            # ordered (dy, dx, out): each input pixel's four output pixels, channels last.
            self._upscale1 = cast(torch.Tensor, conv1.weight).permute(0, 2, 3, 1).reshape(dim, -1)
            self._bias1 = cast(torch.Tensor, conv1.bias).repeat(4)
            self._upscale2 = cast(torch.Tensor, conv2.weight).permute(0, 2, 3, 1).flatten(1)
            self._bias2 = cast(torch.Tensor, conv2.bias).repeat(4)

    @torch.inference_mode()
    def decode(
        self,
        boxes: torch.Tensor | None = None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask_logits: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits for N prompts; arguments and results as `PromptableSegmenter.decode`.

        Returns:
            ``(N, K, 4 H, 4 W)`` low-resolution logits and ``(N, K)`` predicted IoU, K = 3 with
            ``multimask_output`` else 1.
        """
        model, decoder = self.model, self.model.mask_decoder
        sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=mask_logits)
        batch = sparse.shape[0]
        prompt_pe = decoder.tokens(sparse)  # (B, N, D): also the tokens' positional term, as in SAM

        queries, keys = prompt_pe, self._keys
        for index, layer in enumerate(self._layers):
            if index == 0 and mask_logits is None:
                queries, keys = self._first_block(layer, queries, prompt_pe)
            else:
                if index == 0:
                    keys = self._image + dense.flatten(2).transpose(1, 2)
                queries, keys = self._block(layer, queries, keys, prompt_pe)
        if keys.ndim == 2:  # depth 0
            keys = keys.expand(batch, -1, -1)
        # After the last block the tokens no longer meet each other, so the final attention runs only
        # for the tokens read out: the IoU token and the requested mask tokens.
        chosen = range(1, decoder.num_mask_tokens) if multimask_output else range(1)
        read_out = [0] + [1 + i for i in chosen]
        queries, prompt_pe = queries[:, read_out], prompt_pe[:, read_out]
        transformer = decoder.transformer
        update = _token_to_image(transformer.final_attn_token_to_image, queries + prompt_pe, keys + self._pe, keys)
        queries = transformer.norm_final_attn(queries + update)

        mlps = decoder.output_hypernetworks_mlps
        hyper = torch.stack([mlps[i](queries[:, 1 + k]) for k, i in enumerate(chosen)], dim=1)
        masks = self._upscale_and_dot(keys, hyper)
        iou = decoder.iou_prediction_head(queries[:, 0])
        return masks, iou[:, chosen.start : chosen.stop]

    def _first_block(
        self, layer: TwoWayAttentionBlock, queries: torch.Tensor, prompt_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Block 1 on the cached image side (no mask prompt): its image projections are precomputed."""
        queries = layer.attend_tokens(queries, prompt_pe)
        attn = layer.cross_attn_token_to_image
        query = split_heads(attn.q_proj(queries + prompt_pe), attn.num_heads)  # (B, h, N, c)
        weights = torch.softmax(query @ self._first_keys.transpose(-2, -1) / math.sqrt(query.shape[-1]), dim=-1)
        queries = layer.norm2(queries + attn.out_proj(merge_heads(weights @ self._first_values)))
        queries = layer.norm3(queries + layer.mlp(queries))

        attn = layer.cross_attn_image_to_token
        token_keys = split_heads(attn.k_proj(queries + prompt_pe), attn.num_heads)  # (B, h, N, c)
        logits = token_keys / math.sqrt(token_keys.shape[-1]) @ self._first_image_queries  # (B, h, N, HW)
        updated = _mix_tokens(attn, logits, queries, self._keys)
        return queries, layer.norm4(updated)

    def _block(
        self, layer: TwoWayAttentionBlock, queries: torch.Tensor, keys: torch.Tensor, prompt_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A two-way block as `TwoWayAttentionBlock.forward`, with the reassociated cross-attentions."""
        queries = layer.attend_tokens(queries, prompt_pe)
        keys_with_pe = keys + self._pe
        update = _token_to_image(layer.cross_attn_token_to_image, queries + prompt_pe, keys_with_pe, keys)
        queries = layer.norm2(queries + update)
        queries = layer.norm3(queries + layer.mlp(queries))
        updated = _image_to_token(layer.cross_attn_image_to_token, keys_with_pe, queries + prompt_pe, queries, keys)
        return queries, layer.norm4(updated)

    def _upscale_and_dot(self, keys: torch.Tensor, hyper: torch.Tensor) -> torch.Tensor:
        """``(B, HW, D)`` image tokens and ``(B, M, D / 8)`` mask weights -> ``(B, M, 4H, 4W)`` logits."""
        batch, masks = hyper.shape[:2]
        height, width = self.grid
        norm = self._norm
        wide = torch.addmm(self._bias1, keys.reshape(-1, keys.shape[-1]), self._upscale1)
        wide = wide.view(-1, norm.weight.shape[0])  # (B * HW * 4, D / 4), pixels ordered (y, x, dy, dx)
        wide = _activate(self._act1, F.layer_norm(wide, norm.weight.shape, norm.weight, norm.bias, norm.eps))
        fine = _activate(self._act2, torch.addmm(self._bias2, wide, self._upscale2))
        logits = fine.view(batch, -1, hyper.shape[-1]) @ hyper.transpose(1, 2)  # (B, HW * 16, M), pixels
        # ordered (y, x, dy, dx, dy2, dx2)
        logits = logits.view(batch, height, width, 2, 2, 2, 2, masks).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return logits.reshape(batch, masks, 4 * height, 4 * width)


def _activate(activation: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``activation(x)``, in place for SAM's GELU (x is a temporary of the current call)."""
    if type(activation) is nn.GELU and activation.approximate == "none":
        return torch.ops.aten.gelu_(x)
    return activation(x)


def _head_weights(linear: nn.Linear, heads: int) -> torch.Tensor:
    """A projection's ``(h * c, D)`` weight as ``(h, c, D)``."""
    return linear.weight.view(heads, -1, linear.weight.shape[1])


def _token_to_image(
    attn: Attention, tokens: torch.Tensor, image_with_pe: torch.Tensor, image: torch.Tensor
) -> torch.Tensor:
    """``attn(q=tokens (B, N, D), k=image_with_pe, v=image (B or 1, HW, D))`` without projecting the image."""
    heads, n = attn.num_heads, tokens.shape[1]
    if heads * n >= attn.internal_dim:
        return attn(q=tokens, k=image_with_pe, v=image)
    query = split_heads(attn.q_proj(tokens), heads)  # (B, h, N, c)
    batch, _, _, width = query.shape
    # The key bias adds query . bias to a whole softmax row, which the softmax ignores.
    folded = (query / math.sqrt(width) @ _head_weights(attn.k_proj, heads)).reshape(batch, heads * n, -1)
    weights = torch.softmax(folded @ image_with_pe.transpose(-2, -1), dim=-1)  # (B, hN, HW)
    mixed = (weights @ image).view(batch, heads, n, -1)  # (B, h, N, D)
    values = mixed @ _head_weights(attn.v_proj, heads).transpose(1, 2) + attn.v_proj.bias.view(heads, 1, -1)
    return attn.out_proj(merge_heads(values))


def _image_to_token(
    attn: Attention,
    image_with_pe: torch.Tensor,
    tokens_with_pe: torch.Tensor,
    tokens: torch.Tensor,
    residual: torch.Tensor,
) -> torch.Tensor:
    """``residual + attn(q=image_with_pe (B or 1, HW, D), k=tokens_with_pe, v=tokens (B, N, D))`` ->
    ``(B, HW, D)``, with the image-side query projection folded into the N tokens."""
    heads, n = attn.num_heads, tokens.shape[1]
    if heads * n >= attn.internal_dim:
        return residual + attn(q=image_with_pe, k=tokens_with_pe, v=tokens)
    token_keys = split_heads(attn.k_proj(tokens_with_pe), heads)  # (B, h, N, c)
    batch, _, _, width = token_keys.shape
    token_keys = token_keys / math.sqrt(width)  # the attention's scale, applied to the small side
    folded = (token_keys @ _head_weights(attn.q_proj, heads)).reshape(batch, heads * n, -1)  # (B, hN, D)
    bias = (token_keys * attn.q_proj.bias.view(heads, 1, -1)).sum(-1).reshape(batch, heads * n, 1)
    logits = torch.baddbmm(bias, folded, image_with_pe.transpose(-2, -1).expand(batch, -1, -1))  # (B, hN, HW)
    return _mix_tokens(attn, logits.view(batch, heads, n, -1), tokens, residual)


def _mix_tokens(attn: Attention, logits: torch.Tensor, tokens: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual (B or 1, HW, D)`` plus the attention output: softmax over the tokens of ``(B, h, N, HW)``
    logits, then values, output projection and residual add in one ``(B, HW, hN) @ (B, hN, D)`` product."""
    # (B, h, N, HW) keeps the long axis contiguous: a softmax over a last axis of N ~ 7 is 15x slower.
    batch, heads, n, pixels = logits.shape
    weights = torch.softmax(logits, dim=2).reshape(batch, heads * n, pixels)
    values = split_heads(attn.v_proj(tokens), heads)  # (B, h, N, c)
    out_weight = attn.out_proj.weight.view(attn.out_proj.weight.shape[0], heads, -1).permute(1, 2, 0)  # (h, c, D)
    # Each head's weights sum to one over its N tokens, so the output bias, spread over the h heads'
    # rows, is added exactly once per pixel.
    mixed = (values @ out_weight + attn.out_proj.bias / heads).reshape(batch, heads * n, -1)  # (B, hN, D)
    return torch.baddbmm(residual, weights.transpose(1, 2), mixed)
