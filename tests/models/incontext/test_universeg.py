"""UniverSeg network: official state_dict layout, support-order invariance, and agreement with the official
implementation when it is importable (github.com/JJGO/UniverSeg is not on PyPI)."""

from __future__ import annotations

from importlib.util import find_spec

import pytest
import torch

from medseg.models.incontext import UniverSeg, universeg_v1


def test_v1_has_the_official_parameter_names_and_shapes() -> None:
    shapes = {k: tuple(v.shape) for k, v in universeg_v1().state_dict().items()}
    assert len(shapes) == 44  # 7 CrossBlocks x 3 convs x (weight, bias) + the output conv
    assert shapes["enc_blocks.0.cross.cross_conv.weight"] == (64, 3, 3, 3)  # query 1 + support image 1 + mask 1
    assert shapes["enc_blocks.1.cross.cross_conv.weight"] == (64, 128, 3, 3)
    assert shapes["dec_blocks.0.cross.cross_conv.weight"] == (64, 256, 3, 3)  # up-sampled + skip, both paths
    assert shapes["enc_blocks.3.target.vmapped.conv.weight"] == (64, 64, 3, 3)
    assert shapes["out_conv.conv.weight"] == (1, 64, 1, 1)


def test_output_does_not_depend_on_support_order_or_batch_neighbours() -> None:
    torch.manual_seed(0)
    model = UniverSeg([(8, 8)] * 3).eval()
    query = torch.rand(2, 1, 32, 32)
    images, labels = torch.rand(2, 4, 1, 32, 32), (torch.rand(2, 4, 1, 32, 32) > 0.5).float()
    with torch.no_grad():
        out = model(query, images, labels)
        order = torch.tensor([2, 0, 3, 1])
        shuffled = model(query, images[:, order], labels[:, order])
        alone = model(query[1:], images[1:], labels[1:])
    assert out.shape == (2, 1, 32, 32)
    assert torch.allclose(out, shuffled, atol=1e-5)
    assert torch.allclose(out[1:], alone, atol=1e-5)


@pytest.mark.skipif(find_spec("universeg") is None, reason="the official universeg package is not installed")
def test_agrees_with_the_official_implementation() -> None:
    from universeg import universeg  # type: ignore[import-not-found]

    torch.manual_seed(0)
    reference = universeg().eval()
    ours = universeg_v1().eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    query, images = torch.rand(1, 1, 64, 64), torch.rand(1, 3, 1, 64, 64)
    labels = (torch.rand(1, 3, 1, 64, 64) > 0.5).float()
    with torch.no_grad():
        assert torch.equal(reference(query, images, labels), ours(query, images, labels))
