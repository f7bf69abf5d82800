"""Supervised networks: output shapes in 2D and 3D, deep supervision, odd channel counts, config checks."""

from __future__ import annotations

import pytest
import torch

from medseg.errors import MedsegError
from medseg.models.supervised import NetworkConfig, build_network


def _config(name: str, dims: int, channels: int = 1, **kw: object) -> NetworkConfig:
    depth = 3
    return NetworkConfig(
        name, dims, channels, 3, [[2] * dims] * depth, [[3] * dims] * (depth + 1), base_features=8, **kw
    )


@pytest.mark.parametrize(("name", "dims"), [("unet", 2), ("unet", 3), ("vnet", 2), ("vnet", 3), ("transunet", 2)])
def test_logits_have_the_input_size(name: str, dims: int) -> None:
    shape = (16, 24, 16)[:dims] if dims == 3 else (32, 48)
    network = build_network(_config(name, dims, channels=3, patch_size=list(shape))).eval()
    with torch.no_grad():
        out = network(torch.randn(2, 3, *shape))
    assert out.shape == (2, 3, *shape)


def test_unet_deep_supervision_returns_every_output_at_full_size() -> None:
    network = build_network(_config("unet", 2, deep_supervision=True)).train()
    out = network(torch.randn(2, 1, 32, 32))
    assert out.shape[:3] == (2, 3, 3)  # main output + 2 deeper ones and out.shape[-2:] == (32, 32)


def test_transunet_other_sizes_interpolate_position_embeddings() -> None:
    network = build_network(_config("transunet", 2, patch_size=[32, 32])).eval()
    with torch.no_grad():
        assert network(torch.randn(1, 1, 64, 48)).shape == (1, 3, 64, 48)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "resnet"}, "unknown model"),
        ({"name": "transunet", "spatial_dims": 3, "strides": [[2, 2, 2]], "kernel_sizes": [[3] * 3] * 2}, "2D"),
        ({"kernel_sizes": [[3, 3]]}, "kernel_sizes"),
        ({"out_channels": 1}, "two output classes"),
    ],
)
def test_bad_configs_are_refused(change: dict, message: str) -> None:
    config = _config("unet", 2).to_dict() | change
    with pytest.raises(MedsegError, match=message):
        build_network(NetworkConfig.from_dict(config))
