"""Intensity normalisation: values worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.io.image import Geometry, Image
from medseg.preprocessing import (
    CT_WINDOWS,
    IntensityPreset,
    ct_window,
    ct_window_by_name,
    mr_normalize,
    normalize,
    preset_for_modality,
    rgb_to_unit,
)


def test_ct_window_soft_tissue_by_hand() -> None:
    hu = np.array([-1000, -160, 40, 140, 240, 3000], dtype=np.int16)
    out = ct_window(hu, level=40, width=400)  # window [-160, 240]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [0.0, 0.0, 0.5, 0.75, 1.0, 1.0])
    assert hu[0] == -1000  # input untouched


def test_ct_window_by_name() -> None:
    hu = np.array([-1350.0, -600.0, 150.0])
    np.testing.assert_allclose(ct_window_by_name(hu, "lung"), [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(ct_window_by_name(hu, "Abdomen"), ct_window_by_name(hu, "soft_tissue"))
    assert CT_WINDOWS["brain"] == (40, 80)
    with pytest.raises(MedsegError, match="lung"):
        ct_window_by_name(hu, "liver")
    with pytest.raises(MedsegError, match="positive"):
        ct_window(hu, 40, 0)


def test_mr_zscore_on_foreground() -> None:
    array = np.zeros((4, 5), dtype=np.float32)
    array[1:3, :] = np.arange(1, 11).reshape(2, 5)  # foreground 1..10, background 0
    out = mr_normalize(array, lower=0, upper=100)
    fg = array > 0
    assert out[fg].mean() == pytest.approx(0, abs=1e-6)
    assert out[fg].std() == pytest.approx(1, abs=1e-6)
    # background is clipped to the foreground minimum (1) before standardising: (1 - 5.5) / sqrt(8.25)
    np.testing.assert_allclose(out[~fg], -4.5 / np.sqrt(8.25), rtol=1e-6)


def test_mr_percentile_clip_unit_mode() -> None:
    array = np.arange(1, 102, dtype=np.float64)  # percentiles 1 and 99 of 1..101 are 2 and 100
    out = mr_normalize(array, lower=1, upper=99, mode="unit")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[[0, 1, 50, 99, 100]], [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-7)


def test_mr_zscore_after_clipping_has_unit_std() -> None:
    rng = np.random.default_rng(0)
    array = rng.normal(100, 20, size=(8, 8, 8)).clip(1, None)
    out = mr_normalize(array)
    assert out.mean() == pytest.approx(0, abs=1e-5)
    assert out.std() == pytest.approx(1, abs=1e-5)


def test_mr_mask_and_fallbacks() -> None:
    array = np.array([[0.0, 0.0], [2.0, 4.0]])
    mask = np.array([[False, False], [True, True]])
    out = mr_normalize(array, mask, lower=0, upper=100)
    np.testing.assert_allclose(out, [[-1, -1], [-1, 1]])  # clipped to [2, 4], mean 3, std 1
    # no positive voxel: every voxel is foreground
    neg = np.array([-4.0, -2.0])
    np.testing.assert_allclose(mr_normalize(neg, lower=0, upper=100), [-1, 1])
    # constant image: std guard, no NaN
    np.testing.assert_array_equal(mr_normalize(np.full(5, 7.0)), np.zeros(5))
    np.testing.assert_array_equal(mr_normalize(np.full(5, 7.0), mode="unit"), np.zeros(5))
    # one foreground value (a two-valued image): 1 there, 0 below, not every voxel blanked to 0 (issue 22)
    np.testing.assert_array_equal(mr_normalize(np.array([0.0, 100.0, 100.0]), mode="unit"), [0, 1, 1])
    # NaN stays NaN and is left out of the statistics
    np.testing.assert_allclose(mr_normalize(np.array([np.nan, 2.0, 4.0]), lower=0, upper=100), [np.nan, -1, 1])


def test_mr_errors() -> None:
    array = np.ones((2, 2))
    with pytest.raises(MedsegError, match="no foreground"):
        mr_normalize(array, np.zeros((2, 2), bool))
    with pytest.raises(MedsegError, match="shape"):
        mr_normalize(array, np.ones((3, 2), bool))
    with pytest.raises(MedsegError, match="percentiles"):
        mr_normalize(array, lower=60, upper=40)
    with pytest.raises(MedsegError, match="mode"):
        mr_normalize(array, mode="minmax")


def test_rgb_to_unit() -> None:
    np.testing.assert_allclose(rgb_to_unit(np.array([0, 51, 255], np.uint8)), [0, 0.2, 1])
    np.testing.assert_allclose(rgb_to_unit(np.array([0, 65535], np.uint16)), [0, 1])
    np.testing.assert_array_equal(rgb_to_unit(np.array([0.0, 0.25, 1.0])), [0, 0.25, 1])
    np.testing.assert_allclose(rgb_to_unit(np.array([0.0, 127.5, 255.0])), [0, 0.5, 1])
    np.testing.assert_allclose(rgb_to_unit(np.array([0, 255], np.int32)), [0, 1])
    assert rgb_to_unit(np.zeros((2, 2, 3), np.uint8)).dtype == np.float32
    with pytest.raises(MedsegError):
        rgb_to_unit(np.array([0.0, 300.0]))


@pytest.mark.parametrize(
    "preset",
    [
        IntensityPreset("ct:lung"),
        IntensityPreset("ct", level=50, width=350),
        IntensityPreset("mr"),
        IntensityPreset("mr", mode="unit", lower=1, upper=99),
        IntensityPreset("percentile", mode="unit"),
        IntensityPreset("rgb"),
        IntensityPreset("none"),
    ],
)
def test_preset_json_round_trip(preset: IntensityPreset) -> None:
    assert IntensityPreset.from_dict(json.loads(json.dumps(preset.to_dict()))) == preset


def test_preset_validation() -> None:
    assert IntensityPreset.from_dict({"name": "ct", "level": 40, "width": 400}).window() == (40.0, 400.0)
    assert IntensityPreset("ct:bone").window() == (400.0, 1800.0)
    for bad in (
        lambda: IntensityPreset("pet"),
        lambda: IntensityPreset("ct"),
        lambda: IntensityPreset("ct:liver"),
        lambda: IntensityPreset("ct:lung", level=1, width=2),
        lambda: IntensityPreset("mr", level=1),
        lambda: IntensityPreset("mr:x"),
        lambda: IntensityPreset("mr", mode="minmax"),
        lambda: IntensityPreset("percentile", lower=99, upper=1),
        lambda: IntensityPreset.from_dict({"name": "mr", "lower": None}),
        lambda: IntensityPreset.from_dict({"name": 3}),
        lambda: IntensityPreset.from_dict(["mr"]),
        lambda: IntensityPreset.from_dict({"level": 1}),
        lambda: IntensityPreset.from_dict({"name": "mr", "colour": 1}),
        lambda: IntensityPreset.from_dict({"name": "ct", "level": "40", "width": 400}),
        lambda: IntensityPreset("mr").window(),
    ):
        with pytest.raises(MedsegError):
            bad()


def test_normalize_dispatch_keeps_geometry() -> None:
    geometry = Geometry((0.5, 0.5, 2.0), (1.0, 2.0, 3.0), tuple(np.eye(3).ravel().tolist()))
    ct = Image(np.array([[[-160, 40], [240, 1000]]], np.int16), geometry, meta={"path": "ct.nii.gz"})
    out = normalize(ct, IntensityPreset("ct:soft_tissue"))
    assert out.geometry == geometry and out.meta["path"] == "ct.nii.gz"
    np.testing.assert_array_equal(out.array, [[[0, 0.5], [1, 1]]])
    assert normalize(ct, IntensityPreset("none")).array is ct.array
    rgb = Image(np.full((2, 2, 3), 255, np.uint8), channels=3)
    np.testing.assert_array_equal(normalize(rgb, IntensityPreset("rgb")).array, np.ones((2, 2, 3)))


def test_a_ct_window_on_8_bit_pixels_is_refused() -> None:
    """Issue 22: an 8-bit photo or screenshot holds no Hounsfield units; a window in HU on it is refused."""
    photo = Image(np.array([[0, 128], [200, 255]], np.uint8), meta={"path": "photo.png"})
    with pytest.raises(MedsegError) as caught:
        normalize(photo, IntensityPreset("ct:lung"))
    assert str(caught.value) == (
        "photo.png: intensity preset ct:lung is a CT window in Hounsfield units, but this uint8 image's "
        "8-bit levels hold none: choose another preset (e.g. none or percentile)"
    )
    normalize(photo, IntensityPreset("ct", level=128, width=200))  # a plan's window from its own data's percentiles
    with pytest.raises(MedsegError, match="Hounsfield"):
        normalize(Image(np.zeros((3, 3, 3), np.uint8), channels=3), IntensityPreset("ct:bone"))
    normalize(photo, IntensityPreset("percentile", mode="unit"))  # other presets are fine
    normalize(Image(np.array([[-1000, 40]], np.int16)), IntensityPreset("ct:lung"))  # 16-bit CT is fine


def test_normalize_multichannel_mr_is_per_channel() -> None:
    a = np.stack([np.array([[1.0, 3.0], [1.0, 3.0]]), np.array([[10.0, 30.0], [10.0, 30.0]])], axis=-1)
    out = normalize(Image(a, channels=2), IntensityPreset("mr", lower=0, upper=100))
    expected = np.array([[-1.0, 1.0], [-1.0, 1.0]])
    np.testing.assert_allclose(out.array[..., 0], expected)
    np.testing.assert_allclose(out.array[..., 1], expected)


def test_percentile_uses_all_pixels() -> None:
    grey = Image(np.array([[0.0, 0.0], [50.0, 100.0]]))
    out = normalize(grey, IntensityPreset("percentile", mode="unit", lower=0, upper=100))
    np.testing.assert_allclose(out.array, np.array([[0, 0], [0.5, 1]]), atol=1e-6)  # 0 is not background here
    mr = normalize(grey, IntensityPreset("mr", mode="unit", lower=0, upper=100))
    np.testing.assert_allclose(mr.array, np.array([[0, 0], [0, 1]]), atol=1e-6)  # mr: foreground is > 0 only
    # default 0.5 / 99.5 percentiles of [0, 0, 50, 100]: 0 and 50 + 0.985 * 50 = 99.25
    default = normalize(grey, preset_for_modality("XR", 1))
    np.testing.assert_allclose(default.array, np.array([[0, 0], [50 / 99.25, 1]]), rtol=1e-6)


def test_preset_for_modality() -> None:
    assert preset_for_modality("CT", 1) == IntensityPreset("ct:soft_tissue")
    assert preset_for_modality("mr", 1).name == "mr"
    assert preset_for_modality(" MRI ", 1).mode == "zscore"
    assert preset_for_modality("endoscopy", 3).name == "rgb"
    assert preset_for_modality("US", 1) == IntensityPreset("percentile", mode="unit")


def test_normalize_is_reproducible() -> None:
    rng = np.random.default_rng(1)
    image = Image(rng.normal(size=(6, 7, 8)).astype(np.float32))
    a = normalize(image, IntensityPreset("mr")).array
    b = normalize(image, IntensityPreset("mr")).array
    np.testing.assert_array_equal(a, b)
