"""Whole-image class probabilities from a patch-trained network: MONAI's sliding-window inference with
Gaussian importance weighting (as nnU-Net), optionally averaged over mirrored copies (test-time
augmentation)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn


@torch.no_grad()
def predict_probabilities(
    network: nn.Module,
    image: torch.Tensor,
    patch_size: Sequence[int],
    mirror_axes: Sequence[int] = (),
    overlap: float = 0.5,
    batch_size: int = 4,
) -> torch.Tensor:
    """Softmax probabilities for one image.

    Args:
        network: in eval mode; maps ``(B, C, *patch)`` to logits ``(B, K, *patch)``.
        image: ``(C, *spatial)`` float32, already normalised and on the plan's grid.
        patch_size: the window, as trained; images smaller than it are padded.
        mirror_axes: spatial axes to mirror for test-time augmentation (all 2^n combinations).
        overlap: fraction of the window shared by neighbouring windows.

    Returns:
        ``(K, *spatial)`` float32 probabilities.
    """
    from monai.inferers import sliding_window_inference

    batch = image[None]
    flips = [()] + [combo for n in range(1, len(mirror_axes) + 1) for combo in itertools.combinations(mirror_axes, n)]
    total: torch.Tensor | None = None
    for flip in flips:
        dims = [a + 2 for a in flip]
        shown = torch.flip(batch, dims) if dims else batch
        logits = sliding_window_inference(
            shown, list(patch_size), batch_size, network, overlap=overlap, mode="gaussian", padding_mode="constant"
        )
        assert isinstance(logits, torch.Tensor)
        probabilities = torch.softmax(logits.float(), dim=1)
        probabilities = torch.flip(probabilities, dims) if dims else probabilities
        total = probabilities if total is None else total + probabilities
    assert total is not None
    return (total / len(flips))[0]
