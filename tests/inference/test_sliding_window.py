"""Sliding-window probabilities: shape, normalisation, and equality with whole-image inference for a
network that acts voxel by voxel (Gaussian weights average identical values)."""

from __future__ import annotations

import torch
from torch import nn

from medseg.inference.sliding_window import predict_probabilities


def _pointwise(dims: int) -> nn.Module:
    torch.manual_seed(0)
    conv = (nn.Conv3d if dims == 3 else nn.Conv2d)(2, 3, 1)
    return conv.eval()


def test_windows_agree_with_the_whole_image_for_a_pointwise_network() -> None:
    for dims, shape, patch in ((2, (37, 50), (16, 16)), (3, (9, 20, 13), (8, 8, 8))):
        network = _pointwise(dims)
        image = torch.randn(2, *shape)
        windows = predict_probabilities(network, image, patch, overlap=0.5)
        with torch.no_grad():
            whole = torch.softmax(network(image[None]), dim=1)[0]
        assert windows.shape == (3, *shape)
        assert torch.allclose(windows, whole, atol=1e-5)


def test_mirroring_is_undone_and_images_smaller_than_the_patch_are_padded() -> None:
    network = _pointwise(2)
    image = torch.randn(2, 10, 7)
    plain = predict_probabilities(network, image, (16, 16))
    mirrored = predict_probabilities(network, image, (16, 16), mirror_axes=(0, 1))
    assert plain.shape == (3, 10, 7)
    assert torch.allclose(plain.sum(0), torch.ones(10, 7), atol=1e-5)
    assert torch.allclose(plain, mirrored, atol=1e-5)  # a pointwise network commutes with flips
