"""The position-aware volume probe: its position features, targets and row sampling, and the
`FeatureMatchingPredictor` path that uses it for support volumes (with the transparent stand-in encoder)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medseg.inference.volume_probe as module
from medseg.errors import MedsegError
from medseg.inference.feature_incontext import FeatureMatchingPredictor, unpack_masks
from medseg.inference.volume_probe import (
    POSITION_CHANNELS,
    POSITION_SCALE,
    fit_volume_probes,
    location_targets,
    position_rows,
    volume_frame_size,
)
from medseg.metrics.surface import dice
from medseg.models.incontext.support_probe import FEATURE_SCALE, SupportProbe, fit_support_probes
from stand_in_encoders import PooledIntensity


def _look_alike_volume(seed: int, depth: int = 8, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Bright discs at random places on every slice: label 1 in the first half of the depth, label 2 in the
    second. The two labels look the same: only the position tells them apart."""
    rng = np.random.default_rng(seed)
    volume = rng.normal(0.1, 0.02, (depth, size, size)).astype(np.float32)
    labels = np.zeros((depth, size, size), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for z in range(depth):
        cy, cx = rng.integers(14, size - 14, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 9**2
        volume[z][disc], labels[z][disc] = 1.0, 1 if z < depth // 2 else 2
    return volume, labels


def test_position_rows_are_row_major_and_scaled() -> None:
    rows = position_rows(2, 8, 4)
    assert rows.shape == (16, POSITION_CHANNELS) and rows.dtype == torch.float32
    assert float(rows.abs().max()) <= POSITION_SCALE / FEATURE_SCALE + 1e-6
    assert torch.equal(rows[0, :6], rows[15, :6])  # depth features: the same on the whole slice
    assert not torch.equal(rows[0], rows[1]) and not torch.equal(rows[0], rows[4])  # next column, next row
    assert torch.equal(rows[1, 6:8], rows[0, 6:8])  # the same row: its row features agree
    assert not torch.equal(position_rows(3, 8, 4)[:, :6], rows[:, :6])


@pytest.mark.parametrize(("side", "frame"), [(20, 64), (51, 64), (65, 80), (100, 112), (128, 128), (512, 128)])
def test_volume_frame_size_follows_the_slices(side: int, frame: int) -> None:
    assert volume_frame_size([np.zeros((3, side, 10)), np.zeros((5, 12, 12))]) == frame


def test_location_targets_match_the_predictors_masks() -> None:
    label = np.zeros((40, 30), np.uint8)
    label[5:20, 3:17], label[25:38, 10:28] = 1, 2
    predictor = FeatureMatchingPredictor(PooledIntensity(), frame_size=64)
    predictor.frame(np.zeros((40, 30), np.float32))  # sets the predictor's grid (32)
    fine = unpack_masks(predictor.label_masks(label, [1, 2])[None])[0]
    expected = torch.nn.functional.avg_pool2d(fine[:, None], 2).reshape(2, -1).T
    torch.testing.assert_close(location_targets(label, [1, 2], 32), expected)


def test_beyond_the_row_limit_each_slice_keeps_an_equal_share_half_foreground(monkeypatch: pytest.MonkeyPatch) -> None:
    fitted: list[torch.Tensor] = []

    def recording_fit(rows: torch.Tensor, targets: torch.Tensor, **options: object) -> list[SupportProbe]:
        fitted.extend(targets.T)
        return fit_support_probes(rows, targets, steps=2)

    monkeypatch.setattr(module, "fit_support_probes", recording_fit)
    monkeypatch.setattr(module, "MAX_SUPPORT_ROWS", 300)
    volume, labels = _look_alike_volume(0)  # 8 slices of 16 x 16 locations below: 37 rows each
    values = [1, 2]

    def encode(images: list[np.ndarray]) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.rand(len(images), 5, 16, 16), dim=1)

    probes = fit_volume_probes(encode, [volume], [labels], values, [np.arange(1)])
    assert len(probes) == 1 and all(p is not None for p in probes[0])
    inside = [int((location_targets(labels[z], values, 16) > 0).any(1).sum()) for z in range(8)]
    kept_inside = [min(n, 37 // 2) for n in inside]
    kept = sum(min(37, k + 256 - n) for k, n in zip(kept_inside, inside, strict=True))
    assert len(fitted[0]) == kept <= 300
    foreground_rows = int(sum(((t > 0).sum()) for t in fitted))  # labels 1 and 2 never share a location here
    assert foreground_rows == sum(kept_inside)


def test_the_position_tells_apart_labels_that_look_alike() -> None:
    support = [_look_alike_volume(seed) for seed in range(3)]
    query, truth = _look_alike_volume(10)
    predictor = FeatureMatchingPredictor(PooledIntensity())
    result = predictor.predict(
        query, [v for v, _ in support], [lab for _, lab in support], query_is_volume=True, support_are_volumes=True
    )
    assert result.labels.shape == query.shape and result.probabilities.shape == (2, *query.shape)
    for value in (1, 2):
        assert dice(result.labels == value, truth == value) > 0.8


def test_volume_probes_are_fitted_once_per_support_set_with_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    fits: list[int] = []

    def counting_fit(rows: torch.Tensor, targets: torch.Tensor, **options: int) -> list[SupportProbe]:
        fits.extend([len(rows)] * targets.shape[1])  # one probe per label (fitted together)
        return fit_support_probes(rows, targets, **options)

    monkeypatch.setattr(module, "fit_support_probes", counting_fit)
    predictor = FeatureMatchingPredictor(PooledIntensity(), probe_steps=20)
    support = [_look_alike_volume(seed) for seed in range(2)]
    images, labels = [v for v, _ in support], [lab for _, lab in support]
    calls: list[tuple[int, int]] = []
    options = {"query_is_volume": True, "support_are_volumes": True}
    predictor.predict(_look_alike_volume(10)[0], images, labels, on_slice=lambda z, n: calls.append((z, n)), **options)
    assert len(fits) == 2 and calls == [(i, 16 + 8) for i in range(24)]  # supports' slices, then the query's
    assert predictor.model.images_seen == 24  # the model may be a bfloat16 copy of the encoder
    calls.clear()
    predictor.predict(_look_alike_volume(11)[0], images, labels, on_slice=lambda z, n: calls.append((z, n)), **options)
    assert len(fits) == 2 and calls == [(i, 8) for i in range(8)]  # the same supports: their probes reused
    assert predictor.model.images_seen == 32


def test_the_frame_follows_small_slices_unless_one_is_given() -> None:
    support = [_look_alike_volume(0)]
    options = {"query_is_volume": True, "support_are_volumes": True}
    for given, frame in ((None, 64), (96, 96)):
        sizes: list[int] = []
        encoder = PooledIntensity()
        original = encoder.stage_outputs

        def recording(images: torch.Tensor, stages: int, original=original, sizes=sizes) -> list[torch.Tensor]:
            sizes.append(images.shape[-1])
            return original(images, stages)

        encoder.stage_outputs = recording  # type: ignore[method-assign]
        predictor = FeatureMatchingPredictor(encoder, probe_steps=5, frame_size=given, bfloat16=False)
        predictor.predict(support[0][0], [support[0][0]], [support[0][1]], **options)
        assert set(sizes) == {frame}


def test_matched_slices_remain_available_and_bad_fits_are_refused() -> None:
    support = [_look_alike_volume(seed) for seed in range(2)]
    query, truth = _look_alike_volume(10)
    predictor = FeatureMatchingPredictor(PooledIntensity(), volume_fit="matched", probe_steps=50)
    result = predictor.predict(
        query, [v for v, _ in support], [lab for _, lab in support], query_is_volume=True, support_are_volumes=True
    )
    assert dice(result.labels > 0, truth > 0) > 0.8
    with pytest.raises(MedsegError, match="unknown volume fit"):
        FeatureMatchingPredictor(PooledIntensity(), volume_fit="global")


def test_a_label_thinner_than_a_feature_location_is_still_fitted() -> None:
    """A one-pixel line never covers half of a location: the locations it touches are its targets (as the 2D
    path's soft targets let it be found), not no probe at all."""
    rng = np.random.default_rng(0)
    volume = rng.normal(0.1, 0.02, (6, 48, 48)).astype(np.float32)
    labels = np.zeros(volume.shape, np.uint8)
    volume[:, 6:42, 21], labels[:, 6:42, 21] = 1.0, 1
    result = FeatureMatchingPredictor(PooledIntensity(), probe_steps=50).predict(
        volume, [volume], [labels], query_is_volume=True, support_are_volumes=True
    )
    assert dice(result.labels == 1, labels == 1) > 0.5


def test_slices_without_data_read_as_background() -> None:
    support = [_look_alike_volume(seed) for seed in range(2)]
    query = _look_alike_volume(10)[0]
    query[2], query[5] = np.inf, np.nan
    result = FeatureMatchingPredictor(PooledIntensity(), probe_steps=50).predict(
        query, [v for v, _ in support], [lab for _, lab in support], query_is_volume=True, support_are_volumes=True
    )
    assert not result.labels[2].any() and not result.labels[5].any()


def test_slices_encoded_in_batches_equal_their_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    import medseg.inference.feature_incontext as feature_module

    volume = _look_alike_volume(3)[0]
    predictor = FeatureMatchingPredictor(PooledIntensity(), bfloat16=False)
    batched = predictor.encode_slices(list(volume), 64)
    channels = batched.shape[1]
    for z in range(len(volume)):
        torch.testing.assert_close(batched[z], torch.from_numpy(predictor.frame(volume[z], 64, cache=False)[:channels]))
    monkeypatch.setattr(feature_module, "ENCODE_PIXELS", 3 * 64 * 64)  # calls of 3, 3 and 2 slices
    torch.testing.assert_close(predictor.encode_slices(list(volume), 64), batched)
