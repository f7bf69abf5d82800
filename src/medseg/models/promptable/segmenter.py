"""The SAM-family promptable segmenter: image encoder + prompt encoder + mask decoder.

Kirillov et al. 2023, "Segment Anything"; Ma et al. 2024, "Segment anything in medical images"
(MedSAM); LiteMedSAM (MedSAM on laptop, CVPR 2024 challenge baseline: TinyViT encoder at 256 px).
Attribute names (``image_encoder``, ``prompt_encoder``, ``mask_decoder``) equal the official
checkpoints' key prefixes, so their state_dicts load unchanged.

This module is pure and trainable; resizing, intensity handling, caching and numpy I/O live in
`medseg.inference.prompt_predictor`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from medseg.models.promptable.fast_decoder import CachedImageDecoder
from medseg.models.promptable.image_encoders import for_inference
from medseg.models.promptable.mask_decoder import MaskDecoder
from medseg.models.promptable.prompt_encoder import PromptEncoder


class PromptableSegmenter(nn.Module):
    """Image -> embedding once; (embedding, prompts) -> mask logits many times.

    Coordinates of points and boxes are ``(x, y)`` pixels in the model's input frame (the resized,
    padded ``image_size`` x ``image_size`` image), as in SAM.
    """

    def __init__(self, image_encoder: nn.Module, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` preprocessed images -> ``(B, 256, 64, 64)`` embeddings."""
        return self.image_encoder(images)

    def decode(
        self,
        embeddings: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask_logits: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits for N prompts.

        Args:
            embeddings: ``(1, 256, 64, 64)`` (shared by all prompts) or ``(N, 256, 64, 64)``.
            boxes: ``(N, 4)`` as ``x0, y0, x1, y1``.
            points: coordinates ``(N, P, 2)`` as ``x, y`` and labels ``(N, P)`` (1 positive,
                0 negative, -1 padding).
            mask_logits: ``(N, 1, 256, 256)`` low-resolution logits of a previous prediction.
            multimask_output: three candidate masks per prompt instead of one.

        Returns:
            Low-resolution logits ``(N, K, 256, 256)`` in the input frame scaled by 256 / S, and
            predicted IoU ``(N, K)``; K is 3 with ``multimask_output`` else 1.
        """
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_logits)
        return self.mask_decoder(
            image_embeddings=embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )

    def inference_encoder(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """`embed_image` for inference only: a frozen copy of the encoder with BatchNorm folded into the
        convolutions and channels-last weights (`image_encoders.for_inference`; same embedding up to
        float32 rounding, ~1.6x faster on CPU). It holds the weights as they are when called."""
        encoder = for_inference(self.image_encoder)

        def embed(images: torch.Tensor) -> torch.Tensor:
            return encoder(images.contiguous(memory_format=torch.channels_last)).contiguous()

        return embed

    def image_decoder(self, embedding: torch.Tensor) -> CachedImageDecoder:
        """Inference-only `decode` for many prompts on one ``(1, 256, 64, 64)`` embedding: the image-side
        work is done here once, and each prompt then costs about 40% of a `decode` call."""
        return CachedImageDecoder(self, embedding)

    def forward(
        self, images: torch.Tensor, boxes: torch.Tensor, points: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training path, one prompt per image: ``(B, 3, S, S)``, ``(B, 4)`` -> ``(B, 1, 256, 256)``, ``(B, 1)``."""
        return self.decode(self.embed_image(images), boxes=boxes, points=points)
