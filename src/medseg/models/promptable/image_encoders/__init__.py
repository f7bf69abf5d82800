"""Image encoders of the SAM family whose parameter names match the official checkpoints.

- `TinyViT` / `build_tinyvit_lite_medsam`: LiteMedSAM's encoder, ``(B, 3, 256, 256) -> (B, 256, 64, 64)``;
  loads the ``image_encoder.*`` entries of ``lite_medsam.pth`` (prefix stripped) with ``strict=True``.
- `ImageEncoderViT` / `build_vit_b`: SAM / MedSAM ViT-B, ``(B, 3, 1024, 1024) -> (B, 256, 64, 64)``;
  loads the ``image_encoder.*`` entries of ``sam_vit_b_01ec64.pth`` / ``medsam_vit_b.pth``.
- `for_inference`: a frozen copy of either that runs faster on CPU (BatchNorm folded, channels-last).
"""

from medseg.models.promptable.image_encoders._common import for_inference
from medseg.models.promptable.image_encoders.tiny_vit import TinyViT
from medseg.models.promptable.image_encoders.vit import ImageEncoderViT


def build_tinyvit_lite_medsam() -> TinyViT:
    """LiteMedSAM's TinyViT (Ma et al., MedSAM 2024): 256x256 input, embed dims (64, 128, 160, 320),
    depths (2, 2, 6, 2), heads (2, 4, 5, 10), windows (7, 7, 14, 7); output ``(B, 256, 64, 64)``."""
    return TinyViT(
        img_size=256,
        in_chans=3,
        embed_dims=(64, 128, 160, 320),
        depths=(2, 2, 6, 2),
        num_heads=(2, 4, 5, 10),
        window_sizes=(7, 7, 14, 7),
        mlp_ratio=4.0,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        merge_strides=(2, 2, 1),
        out_chans=256,
    )


def build_vit_b(img_size: int = 1024) -> ImageEncoderViT:
    """SAM ViT-B (Kirillov et al. 2023): patch 16, width 768, depth 12, 12 heads, window 14, global attention
    in blocks (2, 5, 8, 11); ``(B, 3, img_size, img_size) -> (B, 256, img_size / 16, img_size / 16)``."""
    return ImageEncoderViT(
        img_size=img_size,
        patch_size=16,
        in_chans=3,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        out_chans=256,
        window_size=14,
        global_attn_indexes=(2, 5, 8, 11),
    )


__all__ = ["ImageEncoderViT", "TinyViT", "build_tinyvit_lite_medsam", "build_vit_b", "for_inference"]
