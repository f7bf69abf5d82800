"""`CachedImageDecoder` computes what `PromptableSegmenter.decode` computes, for every kind of prompt."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from medseg.models.promptable.fast_decoder import CachedImageDecoder
from medseg.models.promptable.mask_decoder import MaskDecoder
from medseg.models.promptable.prompt_encoder import build_prompt_encoder
from medseg.models.promptable.segmenter import PromptableSegmenter
from medseg.models.promptable.two_way_transformer import TwoWayTransformer

FRAME = 256  # LiteMedSAM's input frame (pixels)


def _segmenter(depth: int = 2, seed: int = 0) -> PromptableSegmenter:
    """SAM's prompt encoder and mask decoder with random weights (biases and norms randomised too, so
    that no term of the reordered computation can hide behind a zero), and a dummy image encoder."""
    torch.manual_seed(seed)
    decoder = MaskDecoder(
        transformer_dim=256,
        transformer=TwoWayTransformer(depth=depth, embedding_dim=256, mlp_dim=512, num_heads=8),
    )
    model = PromptableSegmenter(torch.nn.Identity(), build_prompt_encoder(FRAME), decoder).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def _prompts() -> dict[str, dict[str, object]]:
    boxes = torch.tensor([[30.0, 40.0, 150.0, 200.0], [10.0, 5.0, 90.0, 60.0]])
    points = torch.tensor([[[60.0, 80.0], [120.0, 90.0]]] * 2), torch.tensor([[1, 0]] * 2)
    many = torch.rand(1, 15, 2) * FRAME, torch.randint(0, 2, (1, 15))  # 5 + 15 + 1 tokens: plain order
    return {
        "one box": {"boxes": boxes[:1]},
        "two boxes": {"boxes": boxes},
        "boxes and clicks": {"boxes": boxes, "points": points},
        "clicks only": {"points": (points[0][:1], points[1][:1])},
        "many clicks": {"points": many},
        "three candidates": {"boxes": boxes[:1], "multimask_output": True},
        "previous mask": {"boxes": boxes[:1], "mask_logits": torch.randn(1, 1, FRAME, FRAME)},
    }


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("case", list(_prompts()))
def test_equals_the_modules_order(depth: int, case: str) -> None:
    model = _segmenter(depth)
    embedding = 0.5 * torch.randn(1, 256, 64, 64)
    prompts = _prompts()[case]
    with torch.inference_mode():
        expected_masks, expected_iou = model.decode(embedding, **prompts)  # type: ignore[arg-type]
        masks, iou = CachedImageDecoder(model, embedding).decode(**prompts)  # type: ignore[arg-type]
    assert masks.shape == expected_masks.shape and iou.shape == expected_iou.shape
    scale = expected_masks.abs().max().item()
    assert (masks - expected_masks).abs().max().item() <= 1e-4 * max(scale, 1.0)
    assert torch.allclose(iou, expected_iou, atol=1e-4, rtol=1e-4)


def test_one_decoder_serves_many_prompts_in_any_order() -> None:
    model = _segmenter()
    embedding = torch.randn(1, 256, 64, 64)
    decoder = CachedImageDecoder(model, embedding)
    box = torch.tensor([[30.0, 40.0, 150.0, 200.0]])
    with torch.inference_mode():
        first, _ = decoder.decode(boxes=box)
        decoder.decode(boxes=torch.tensor([[0.0, 0.0, 255.0, 255.0]] * 3))  # another batch size in between
        again, _ = decoder.decode(boxes=box)
    assert torch.equal(first, again)


def test_rejects_a_batch_of_embeddings() -> None:
    with pytest.raises(ValueError, match="one"):
        CachedImageDecoder(_segmenter(), torch.zeros(2, 256, 64, 64))


def test_threads_sharing_one_decoder_get_their_own_results() -> None:
    model = _segmenter()
    decoder = CachedImageDecoder(model, torch.randn(1, 256, 64, 64))
    prompts = [torch.tensor([[10.0 * i, 5.0 * i, 100.0 + 10 * i, 120.0 + 5 * i]] * (1 + i % 3)) for i in range(8)]
    with torch.inference_mode():
        expected = [decoder.decode(boxes=p)[0] for p in prompts]
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda p: decoder.decode(boxes=p)[0], prompts * 3))
    for index, result in enumerate(results):
        torch.testing.assert_close(result, expected[index % len(prompts)], rtol=0, atol=0)
