"""InContextPredictor glue, checked with a transparent stand-in network whose answer is the support masks'
mean (so the right answer is known), and with a small UniverSeg for shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medseg.errors import MedsegError
from medseg.inference.incontext_predictor import InContextPredictor
from medseg.metrics.surface import dice
from medseg.models.incontext import UniverSeg


class MeanOfSupportMasks(nn.Module):
    """Logits that say "foreground where most support masks are foreground"."""

    def forward(self, query: torch.Tensor, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        assert query.ndim == 4 and images.ndim == 5 and masks.shape == images.shape
        return 20 * (masks.mean(dim=1) - 0.5)


def _label_map(shape: tuple[int, int]) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[8:30, 10:40] = 1
    label[36:56, 20:50] = 3
    return label


def test_multi_class_2d_returns_every_support_label_on_the_query_grid() -> None:
    predictor = InContextPredictor(MeanOfSupportMasks())
    label = _label_map((64, 64))
    images = [np.random.default_rng(i).random((64, 64, 3)) for i in range(3)]
    result = predictor.predict(np.zeros((64, 64)), images, [label] * 3)
    assert result.label_values == [1, 3] and result.probabilities.shape == (2, 64, 64)
    assert set(np.unique(result.labels)) <= {0, 1, 3}
    for value in (1, 3):
        assert dice(result.labels == value, label == value) > 0.97


def test_label_values_above_255_survive() -> None:
    label = _label_map((64, 64)).astype(np.int32) * 300  # values 300 and 900
    result = InContextPredictor(MeanOfSupportMasks()).predict(np.zeros((64, 64)), [np.zeros((64, 64))], [label])
    assert result.labels.dtype == np.uint16 and set(np.unique(result.labels)) == {0, 300, 900}
    huge = _label_map((64, 64)).astype(np.int64) * 2**40
    result = InContextPredictor(MeanOfSupportMasks()).predict(np.zeros((64, 64)), [np.zeros((64, 64))], [huge])
    assert result.labels.dtype == np.uint64 and set(np.unique(result.labels)) == {0, 2**40, 3 * 2**40}


def test_support_ensembles_average_random_subsets() -> None:
    predictor = InContextPredictor(MeanOfSupportMasks())
    label = _label_map((64, 64))
    empty = np.zeros_like(label)
    # two of four supports show the task: subsets of two disagree, their average sits near 0.5
    result = predictor.predict(
        np.zeros((64, 64)), [np.ones((64, 64))] * 4, [label, label, empty, empty], ensemble=8, subset_size=2
    )
    inside = result.probabilities[0][label == 1]
    assert 0.1 < inside.mean() < 0.9


def test_3d_query_takes_support_slices_at_the_same_relative_position() -> None:
    predictor = InContextPredictor(MeanOfSupportMasks())
    support = np.zeros((8, 64, 64), np.uint8)
    support[2:4, 10:50, 10:50] = 1  # slices 2-3 of 8: relative positions 0.25-0.5
    result = predictor.predict(
        np.zeros((16, 40, 40)), [np.ones((8, 64, 64))] * 2, [support] * 2, query_is_volume=True,
        support_are_volumes=True, neighbours=0,
    )  # fmt: skip
    found = [z for z in range(16) if result.labels[z].any()]
    assert found == list(range(4, 8))  # the same quarter of the query volume
    assert result.labels.shape == (16, 40, 40)


def test_a_small_universeg_runs_end_to_end() -> None:
    torch.manual_seed(0)
    predictor = InContextPredictor(UniverSeg([(4, 4)] * 3), input_size=32)
    result = predictor.predict(
        np.random.rand(20, 30), [np.random.rand(25, 25)] * 2, [_label_map((64, 64))[:25, :25]] * 2
    )
    assert result.labels.shape == (20, 30) and result.probabilities.shape == (1, 20, 30)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"support_images": [], "support_labels": []}, "empty"),
        ({"support_labels": []}, "1 support images but 0"),
        ({"support_labels": [np.ones((5, 5), np.uint8)]}, "not on its image's grid"),
        ({"support_labels": [np.zeros((10, 10), np.uint8)]}, "no foreground"),
        ({"support_are_volumes": True}, "3D query"),
        ({"ensemble": 0}, "at least 1"),
        ({"ensemble": 2, "subset_size": 0}, "at least 1"),
        ({"neighbours": -1}, "at least 0"),
        ({"ensemble": 1.5}, "must be integers"),
        ({"query": np.zeros((4, 10, 10))}, r"the query has shape \(4, 10, 10\), expected a 2D image"),
        ({"query": np.zeros((2, 3, 10, 10)), "query_is_volume": True}, "expected a volume"),
        ({"query": np.zeros((0, 10, 10)), "query_is_volume": True}, "the query is empty"),
        ({"query": [[0.0, 1.0]]}, "numpy array, not list"),
        ({"query": np.array([["a", "b"]])}, "real-valued"),
        ({"support_images": [np.zeros(10)]}, "support 0 has shape"),
        ({"support_images": [np.zeros((10, 10, 7))]}, "needs support_are_volumes=True"),
        ({"query": np.zeros((3, 10, 10)), "query_is_volume": True, "support_are_volumes": True}, "support 0 has"),
        ({"support_labels": [np.full((10, 10), 0.5)]}, "non-integer"),
        ({"support_labels": [np.full((10, 10), -1)]}, "negative"),
        ({"support_labels": [np.full((10, 10), np.nan)]}, "NaN"),
        ({"ensemble": True}, "must be integers"),
        ({"largest_component": "no"}, "largest_component must be True or False"),
        ({"query": np.full((10, 10), np.inf)}, "the query has no finite values"),
        ({"support_images": [np.full((10, 10), np.nan)]}, "support 0 has no finite values"),
    ],
)
def test_bad_support_sets_are_refused(kwargs: dict, message: str) -> None:
    arguments = {
        "query": np.zeros((10, 10)),
        "support_images": [np.zeros((10, 10))],
        "support_labels": [np.ones((10, 10), np.uint8)],
    }
    with pytest.raises(MedsegError, match=message):
        InContextPredictor(MeanOfSupportMasks()).predict(**(arguments | kwargs))


class MeanOfSupportMasksAndAStray(nn.Module):
    """`MeanOfSupportMasks` with a false positive in a corner, apart from everything the masks show."""

    def forward(self, query: torch.Tensor, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        logits = 20 * (masks.mean(dim=1) - 0.5)
        logits[..., :6, -6:] = 10.0
        return logits


def test_a_stray_component_goes_where_the_supports_show_one_object_per_label() -> None:
    label = _label_map((64, 64))  # labels 1 and 3, one object each (the foreground as a whole: two)
    images = [np.random.default_rng(i).random((64, 64)) for i in range(2)]
    predictor = InContextPredictor(MeanOfSupportMasksAndAStray())
    kept = predictor.predict(np.zeros((64, 64)), images, [label] * 2).labels
    raw = predictor.predict(np.zeros((64, 64)), images, [label] * 2, largest_component=False).labels
    assert raw[:2, -2:].all() and not kept[:8, -8:].any()  # the model's 128 frame: 6 pixels there, 3 here
    assert np.array_equal(kept[8:], raw[8:])
    assert dice(kept == 1, label == 1) > 0.97 and dice(kept == 3, label == 3) > 0.97
    volume = predictor.predict(np.zeros((4, 64, 64)), images, [label] * 2, query_is_volume=True).labels
    assert volume[:, 20, 20].all() and not volume[:, :8, -8:].any()  # 2D supports, 3D query: per slice


class MeanOfSupportMasksInPieces(nn.Module):
    """`MeanOfSupportMasks` with a background band across the middle: every object comes out in two pieces."""

    def forward(self, query: torch.Tensor, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        logits = 20 * (masks.mean(dim=1) - 0.5)
        logits[..., 60:68, :] = -10.0
        return logits


def test_the_rule_is_dropped_where_it_would_cut_the_engines_own_support_predictions() -> None:
    label = np.zeros((64, 64), np.uint8)
    label[10:54, 20:40] = 1  # one object, which this engine cuts in two
    images = [np.random.default_rng(i).random((64, 64)) for i in range(2)]
    result = InContextPredictor(MeanOfSupportMasksInPieces()).predict(np.zeros((64, 64)), images, [label] * 2)
    assert result.labels[15, 30] == 1 and result.labels[50, 30] == 1 and result.labels[32, 30] == 0


def test_the_rule_follows_the_support_contents_and_the_options_not_earlier_calls() -> None:
    label = np.zeros((64, 64), np.uint8)
    label[10:40, 10:40] = 1  # one object: the rule removes the stand-in's stray corner
    edited = label.copy()
    edited[:3, -3:] = 1  # the stray corner made true: confirming on these labels would drop the rule
    images = [np.random.default_rng(i).random((64, 64)) for i in range(2)]
    query = np.zeros((64, 64))
    labels = [label.copy(), label.copy()]
    predictor = InContextPredictor(MeanOfSupportMasksAndAStray())
    predictor.predict(query, images, labels, largest_component=False)  # the rule is confirmed later
    for buffer in labels:  # the caller reuses its buffers
        buffer[:] = edited
    again = predictor.predict(query, images, [label.copy(), label.copy()]).labels
    assert not again[:3, -3:].any()  # confirmed on the supports as they were given, not as later edited
    predictor.predict(query, images, [label, label], ensemble=2, subset_size=1, seed=1)
    assert predictor._prepared is not None and len(predictor._prepared.confirmed) == 2  # one per options


def test_slice_bins_share_each_bins_support_slices_and_none_matches_every_slice_on_its_own() -> None:
    seen: list[int] = []

    class Counting(MeanOfSupportMasks):
        def forward(self, query: torch.Tensor, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
            seen.append(images.shape[1])  # support slices given for this query slice
            return super().forward(query, images, masks)

    predictor = InContextPredictor(Counting())
    support = np.zeros((8, 64, 64), np.uint8)
    support[2:4, 10:50, 10:50] = 1
    common = {"query_is_volume": True, "support_are_volumes": True, "neighbours": 0}
    binned = predictor.predict(
        np.zeros((16, 40, 40)), [np.ones((8, 64, 64))] * 2, [support] * 2, slice_bins=4, **common
    )
    assert set(seen) == {4}  # each bin: 2 slices of each of the 2 support volumes
    seen.clear()
    alone = predictor.predict(
        np.zeros((16, 40, 40)), [np.ones((8, 64, 64))] * 2, [support] * 2, slice_bins=None, **common
    )
    assert set(seen) == {2}  # one matched slice of each support volume
    np.testing.assert_array_equal(binned.labels, alone.labels)  # the foreground's slices fill whole bins here
    with pytest.raises(MedsegError, match="slice_bins must be None or a whole number >= 1"):
        predictor.predict(np.zeros((16, 40, 40)), [np.ones((8, 64, 64))], [support], slice_bins=0, **common)


def test_a_volume_reports_each_slice_for_a_progress_bar() -> None:
    calls: list[tuple[int, int]] = []
    support = np.zeros((8, 64, 64), np.uint8)
    support[2:4, 10:50, 10:50] = 1
    InContextPredictor(MeanOfSupportMasks()).predict(
        np.zeros((5, 40, 40)), [np.ones((8, 64, 64))], [support], query_is_volume=True, support_are_volumes=True,
        on_slice=lambda z, depth: calls.append((z, depth)),
    )  # fmt: skip
    assert calls == [(z, 5) for z in range(5)]


def test_scaled_supports_zoom_in_on_the_foreground_and_out_by_edge_padding() -> None:
    from medseg.inference.incontext_predictor import ZOOM, scaled_supports

    assert ZOOM == 1.5  # the sizes below are worked out for it
    image = np.arange(12 * 18, dtype=np.float32).reshape(12, 18)
    label = np.zeros((12, 18), np.uint8)
    label[8:10, 14:16] = 2  # foreground centred at (8.5, 14.5): the crop is clamped to the corner
    (crop_image, crop_label), (pad_image, pad_label) = scaled_supports(image, label)
    assert crop_image.shape == crop_label.shape == (8, 12)
    assert np.array_equal(crop_image, image[4:12, 6:18]) and np.array_equal(crop_label, label[4:12, 6:18])
    assert pad_image.shape == pad_label.shape == (18, 26)  # 3 rows and round(4.5) = 4 columns either side
    assert np.array_equal(pad_image[3:15, 4:22], image) and pad_image[0, 0] == image[0, 0]  # edge replicated
    assert pad_label.sum() == label.sum() and pad_label[3 + 8, 4 + 14] == 2
    rgb = np.zeros((12, 18, 3), np.uint8)
    assert [a.shape for pair in scaled_supports(rgb, np.zeros((12, 18), np.uint8)) for a in pair] == [
        (8, 12, 3),
        (8, 12),
        (18, 26, 3),
        (18, 26),
    ]  # fmt: skip  (no foreground: the crop is centred)
