"""The prompt engine's inputs: a volume's slices made on demand equal the whole volume's 8-bit levels, and
statistics are taken without volume-sized float copies."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.inference.prompt_input import ModelSlices, intensity_preset, model_input
from medseg.io import Image


def _volumes() -> dict[str, Image]:
    rng = np.random.default_rng(3)
    ct = rng.normal(0, 400, (6, 24, 20)).astype(np.int16)
    ct[0, 0, 0], ct[0, 0, 1] = -1000, 900  # HU range: the CT rule
    mr = np.zeros((5, 16, 18), np.float32)
    mr[:, 4:12, 3:15] = rng.uniform(50, 900, (5, 8, 12))
    mr_int = (mr * 10).astype(np.int16)  # 16-bit integers: values gathered in their own type
    grey16 = rng.integers(0, 4000, (4, 10, 12)).astype(np.uint16)
    rgb = rng.integers(0, 256, (3, 10, 12, 3)).astype(np.uint8)
    return {
        "ct": Image(ct),
        "mr": Image(mr),
        "mr int16": Image(mr_int),
        "grey16": Image(grey16),
        "rgb": Image(rgb, channels=3),
    }


@pytest.mark.parametrize("preset", [None, "none", "percentile", "mr", "ct:lung"])
@pytest.mark.parametrize("name", ["ct", "mr", "mr int16", "grey16", "rgb"])
def test_slices_made_on_demand_equal_the_whole_volumes_levels(name: str, preset: str | None) -> None:
    image = _volumes()[name]
    if name == "rgb" and preset == "ct:lung":  # 8-bit pixels hold no Hounsfield units: refused (issue 22)
        with pytest.raises(MedsegError, match="CT window in Hounsfield units"):
            ModelSlices(image, preset)
        return
    whole = model_input(image, preset)
    slices = ModelSlices(image, preset)
    assert slices.shape == image.array.shape and len(slices) == image.array.shape[0]
    for z in range(len(slices)):
        np.testing.assert_array_equal(slices[z], whole[z])
    assert whole.dtype == np.float32 and whole.min() >= 0 and whole.max() <= 255
    assert (whole == np.floor(whole)).all()  # whole 8-bit levels


def test_the_rule_picks_ct_for_hounsfield_values_and_the_percentile_rule_for_other_volumes() -> None:
    volumes = _volumes()
    assert intensity_preset(volumes["ct"], None).name == "ct:soft_tissue"
    assert intensity_preset(volumes["mr int16"], None).name == "mr"


def test_statistics_of_a_large_volume_need_no_float_copy_of_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from medseg.preprocessing import intensity

    monkeypatch.setattr(intensity, "_BLOCK_VOXELS", 1 << 16)  # blocks small against this volume, as on a real CT
    # 64 slices of 256 x 256 int16 (8 MB): a float32 copy would be 16 MB, a float64 one 32 MB.
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 3000, (64, 256, 256)).astype(np.int16)
    image = Image(volume)
    tracemalloc.start()
    try:
        slices = ModelSlices(image)  # percentiles of the non-zero voxels
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1.2 * volume.nbytes  # the foreground's int16 values plus one block
    low, high = np.percentile(volume[volume > 0], [0.5, 99.5])
    expected = np.floor(np.clip((volume[10].astype(np.float32) - low) / (high - low), 0, 1) * 255.0 + 1e-6)
    np.testing.assert_allclose(slices[10], expected, atol=1.0)  # MedSAM's pre_CT_MR.py rule, up to truncation
