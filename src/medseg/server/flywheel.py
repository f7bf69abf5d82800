"""The flywheel: every finished annotation makes the next one cheaper (MultiverSeg, Wong et al. 2025, in
medseg's engines).

- Every saved label map joins the task's support set; opening another image gives an in-context draft from
  it (2D, and 3D slice by slice), named ``incontext:probe``. With a prompt engine, 2D drafts are redrawn by its
  decoder from each object's box (``incontext:probe+decoder``) when that predicts the last few supports, each
  from the others, better than the raw drafts do (MedSAM's decoder in the loop; decided per task).
- Once ``train_after`` images are done, a specialist (``medseg train``, time-budgeted, resumable) trains in the
  background on them, exported as an nnU-Net raw dataset. When it ends, both drafters segment the run's
  validation cases (the in-context one from the run's training cases as supports): the specialist drafts from
  then on only if its mean Dice there is higher. A new run starts each time the done images double.
- Every draft names its engine; drafts are kept in ``.medseg/drafts`` and shown when the image opens.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.engine.run_files import write_json
from medseg.errors import MedsegError
from medseg.inference.draft_refinement import refine_with_decoder
from medseg.inference.engines import InContextEngine, PromptEngine, Segmentation, SpecialistEngine
from medseg.inference.folders import predict_folder
from medseg.metrics import dice
from medseg.server.workspace import Workspace

SPECIALIST_DIR = "specialist"
MIN_TRAINING_IMAGES = 5  # medseg train's 5-fold split needs a validation image per fold
CHECKED_SUPPORTS = 3  # held-out supports that decide between raw and decoder-refined drafts


@dataclass
class Draft:
    """A draft label map ``(*spatial)`` on the image's grid, the engine that made it, its compute seconds."""

    labels: np.ndarray
    engine: str
    seconds: float


@dataclass
class TrainingStatus:
    """The specialist's background training: ``state`` idle | running | finished | failed | cancelled."""

    state: str = "idle"
    run: str | None = None
    images: int = 0
    minutes: float = 0.0
    epochs_done: int = 0
    started: float | None = None
    message: str = ""
    specialist_dice: float | None = None
    incontext_dice: float | None = None
    in_charge: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


class Flywheel:
    """Drafts and the specialist of one workspace's task; safe to call from several threads.

    Args:
        workspace: the images and their annotations.
        incontext: the in-context engine (None: no in-context drafts; e.g. `InContextEngine.from_pretrained()`).
        train_after: done images that start the first specialist run (0: never train).
        train_minutes: each run's time budget (``medseg train --minutes``).
        max_supports: the most recent done images used as the support set.
        prompt_engine: when given, 2D in-context drafts are redrawn by its decoder from each object's box
            (`refine_with_decoder`) where that does better on held-out supports (engine ``...+decoder``).
        device: for the specialist's training and drafts.
    """

    def __init__(
        self,
        workspace: Workspace,
        incontext: InContextEngine | None,
        train_after: int = 20,
        train_minutes: float = 10.0,
        max_supports: int = 32,
        device: str = "cpu",
        prompt_engine: PromptEngine | None = None,
    ) -> None:
        self.workspace = workspace
        self.prompt_engine = prompt_engine
        self._decoder_choice: dict[int, bool] = {}
        self.incontext = incontext
        self.train_after = train_after
        self.train_minutes = train_minutes
        self.max_supports = max_supports
        self.device = device
        self.specialist: SpecialistEngine | None = None
        self._lock = threading.RLock()
        self._support_key: tuple[tuple[str, int], ...] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self._status_path = workspace.state_dir / SPECIALIST_DIR / "status.json"
        self.training = self._read_status()
        if self.training.in_charge and self.training.run is not None:
            self._load_specialist(self._run_dir(self.training.run))

    # ---- drafts --------------------------------------------------------------------------------------------
    @property
    def drafter(self) -> str | None:
        """The engine that drafts now: ``specialist``, the in-context engine's name, or None."""
        if self.specialist is not None:
            return self.specialist.name
        done = len(self.workspace.done())
        if self.incontext is None or not done:
            return None
        redrawn = self._decoder_choice.get(_stage(min(done, self.max_supports)), False)
        return f"{self.incontext.name}+decoder" if redrawn and self.prompt_engine is not None else self.incontext.name

    def draft(self, image_id: str, keep: bool = True) -> Draft | None:
        """A draft for ``image_id`` from the current drafter (None before any image is done), kept as the
        image's draft when ``keep``.

        Raises:
            UnknownImage: not an image of the workspace. MedsegError: the engine refuses the image.
        """
        image = self.workspace.image(image_id)
        started = time.perf_counter()
        with self._lock:  # the engines are not thread-safe; one draft at a time
            result = self._segment(image_id, image)
        if result is None:
            return None
        draft = Draft(result.labels.array, result.engine, time.perf_counter() - started)
        if keep:
            self.workspace.save_draft(image_id, draft.labels, draft.engine)
        return draft

    def predict_remaining(self, target: Path) -> dict[str, Path]:
        """Label maps from the current drafter for every image not done yet, into ``target`` (`predict_folder`:
        every one written, or none), named by image id in the image's format (NIfTI for DICOM).

        Raises:
            MedsegError: no drafter yet (no image done), no image left, or an image the drafter refuses.
        """
        entries = self.workspace.entries()
        done = set(self.workspace.done())
        cases = {i: list(entry.files) for i, entry in entries.items() if i not in done}
        if not cases:
            raise MedsegError("every image is done: nothing to predict")
        if self.drafter is None:
            raise MedsegError("no drafter yet: save a first annotation")

        def predict(image: Any) -> Segmentation:
            with self._lock:
                result = self._segment(None, image)
            if result is None:
                raise MedsegError("no drafter for this image")
            return result

        protect = [p for entry in entries.values() for p in entry.files]
        return predict_folder(predict, cases, target, protect=protect)

    def _segment(self, image_id: str | None, image: Any) -> Segmentation | None:
        if self.specialist is not None:
            try:
                self.specialist.check(image)
                return self.specialist.predict(image)
            except MedsegError:
                pass  # an image the specialist cannot take (another dimensionality): the in-context engine
        supports = [i for i in self.workspace.done() if i != image_id][-self.max_supports :]
        if self.incontext is None or not supports:
            return None
        self._use_supports(supports)
        result = self.incontext.predict(image)
        if self.prompt_engine is None or image.ndim != 2 or not self._decoder_helps(supports):
            return result
        labels = refine_with_decoder(self.prompt_engine, image, result.labels.array, key=image_id)
        return Segmentation(image.with_array(labels), result.label_values, f"{self.incontext.name}+decoder")

    def _decoder_helps(self, supports: list[str]) -> bool:
        """Whether the decoder-refined drafts beat the raw ones on the last `CHECKED_SUPPORTS` supports, each
        predicted from the others (decided again each time the support set doubles; 2D only)."""
        assert self.incontext is not None and self.prompt_engine is not None
        if len(supports) < 2:
            return False
        stage = _stage(len(supports))
        if stage not in self._decoder_choice:
            values = [v for v in self.workspace.labels.values() if v != 0]
            raw, refined = [], []
            for held in supports[-CHECKED_SUPPORTS:]:
                self._use_supports([i for i in supports if i != held])
                image, truth = self.workspace.image(held), self.workspace.label(held)
                predicted = self.incontext.predict(image).labels.array
                raw.append(mean_dice(predicted, truth, values))
                redrawn = refine_with_decoder(self.prompt_engine, image, predicted, key=held)
                refined.append(mean_dice(redrawn, truth, values))
            self._decoder_choice[stage] = float(np.mean(refined)) > float(np.mean(raw))
            self._use_supports(supports)
        return self._decoder_choice[stage]

    def _use_supports(self, supports: list[str]) -> None:
        assert self.incontext is not None
        stamps = tuple((i, self.workspace.label_path(i).stat().st_mtime_ns) for i in supports)
        if stamps != self._support_key:
            images = [self.workspace.image(i) for i in supports]
            self.incontext.set_support(images, [self.workspace.label(i) for i in supports])
            self._support_key = stamps

    # ---- saving --------------------------------------------------------------------------------------------
    def save(self, image_id: str, labels: np.ndarray, train: bool = True) -> Path:
        """Save the finished label map of ``image_id`` (atomic, the image's geometry); it joins the support set,
        and a specialist run starts in the background when the done images reach the next threshold.

        Raises:
            MedsegError: a label map that does not fit the image or the task (see `Workspace.check_label`).
        """
        path = self.workspace.save_label(image_id, labels)
        if train and self.due():
            self.start_training()
        return path

    def due(self) -> bool:
        """True when no run is going and the done images reached ``train_after`` (then twice the last run's)."""
        if self.train_after <= 0 or self.training.state == "running":
            return False
        done = len(self.workspace.done())
        return done >= max(self.train_after, 2 * self.training.images, MIN_TRAINING_IMAGES)

    # ---- the specialist ------------------------------------------------------------------------------------
    def start_training(self, wait: bool = False, minutes: float | None = None) -> TrainingStatus:
        """Start a specialist run on the done images (``medseg train`` in a child process at lower priority).

        Raises:
            MedsegError: a run is going, or fewer than `MIN_TRAINING_IMAGES` images are done.
        """
        with self._lock:
            if self.training.state == "running":
                raise MedsegError("a specialist is training already; cancel it first")
            done = self.workspace.done()
            if len(done) < MIN_TRAINING_IMAGES:
                raise MedsegError(f"a specialist needs at least {MIN_TRAINING_IMAGES} finished annotations (5 folds)")
            run = f"run-{len(done):04d}"
            folder = self._run_dir(run)
            shutil.rmtree(folder, ignore_errors=True)
            self.workspace.export(folder / "data", name="workbench")
            budget = self.train_minutes if minutes is None else minutes
            self.training = TrainingStatus("running", run, len(done), budget, 0, time.time(), "training",
                                           history=self.training.history)  # fmt: skip
            self._write_status()
            self._process = self._launch(folder, budget, resume=False)
            watcher = threading.Thread(target=self._watch, args=(self._process, folder), daemon=True)
            watcher.start()
        if wait:
            watcher.join()
        return self.training

    def resume_training(self) -> None:
        """After a restart: continue a run that was going when the server stopped (``medseg train --resume``)."""
        with self._lock:
            if self.training.state != "running" or self.training.run is None or self._process is not None:
                return
            folder = self._run_dir(self.training.run)
            self._process = self._launch(folder, self.training.minutes, resume=(folder / "model").is_dir())
            threading.Thread(target=self._watch, args=(self._process, folder), daemon=True).start()

    def cancel_training(self) -> TrainingStatus:
        """Stop the running specialist run (its files stay; the drafter does not change)."""
        with self._lock:
            process = self._process
            if process is None or self.training.state != "running":
                raise MedsegError("no specialist is training")
            self.training.state, self.training.message = "cancelled", "cancelled by the user"
            self._write_status()
        process.terminate()
        return self.training

    def stop(self) -> None:
        """End a running training child without changing its state (the server is stopping): the next start
        continues it with `resume_training`."""
        with self._lock:
            process, self._process = self._process, None
            self._stopping = True
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()

    def status(self) -> dict[str, Any]:
        """The flywheel's state: images done and in all, the drafter, the specialist's training."""
        self._progress()
        return {
            "images": len(self.workspace.entries()),
            "done": len(self.workspace.done()),
            "drafter": self.drafter,
            "train_after": self.train_after,
            "training": asdict(self.training),
        }

    def _launch(self, folder: Path, minutes: float, resume: bool) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "medseg.cli", "train", str(folder / "data"), "-o", str(folder / "model")]
        command += ["--minutes", str(minutes), "--device", self.device]
        command += ["--no-predict-validation"] + (["--resume"] if resume else [])
        nice = (lambda: os.nice(5)) if hasattr(os, "nice") else None  # prompts stay responsive meanwhile
        with (folder / "train.log").open("ab") as log:  # the child keeps its own handle
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=nice)

    def _watch(self, process: subprocess.Popen[bytes], folder: Path) -> None:
        code = process.wait()
        with self._lock:
            self._process = None
            if self.training.state == "cancelled" or self._stopping:
                return
            if code != 0:
                tail = (folder / "train.log").read_text(errors="replace").strip().splitlines()[-1:] or [""]
                self.training.state, self.training.message = "failed", f"medseg train exited {code}: {tail[0][:200]}"
                self._write_status()
                return
            self._progress()
            try:
                self._decide(folder)
            except MedsegError as error:
                self.training.state, self.training.message = "failed", str(error)
            except (OSError, ValueError, KeyError) as error:  # no or a broken split.json: failed, not running forever
                self.training.state, self.training.message = "failed", f"cannot read the run's results ({error})"
            self._write_status()

    def _decide(self, folder: Path) -> None:
        """Both drafters on the run's validation cases; the specialist drafts only if its mean Dice is higher."""
        split = json.loads((folder / "model" / "split.json").read_text())
        train_ids, val_ids = list(split["train"]), list(split["val"])
        specialist = SpecialistEngine.from_pretrained(folder / "model", self.device)
        values = [v for v in self.workspace.labels.values() if v != 0]
        scores: dict[str, list[float]] = {"specialist": [], "incontext": []}
        if self.incontext is not None and train_ids:
            self._use_supports(train_ids[-self.max_supports :])
        for image_id in val_ids:
            image, truth = self.workspace.image(image_id), self.workspace.label(image_id)
            scores["specialist"].append(mean_dice(specialist.predict(image).labels.array, truth, values))
            if self.incontext is not None and train_ids:
                scores["incontext"].append(mean_dice(self.incontext.predict(image).labels.array, truth, values))
        self._support_key = None  # the support set is the run's, not the workspace's
        special = float(np.mean(scores["specialist"])) if scores["specialist"] else 0.0
        context = float(np.mean(scores["incontext"])) if scores["incontext"] else None
        self.training.specialist_dice, self.training.incontext_dice = special, context
        self.training.in_charge = context is None or special > context
        self.training.state = "finished"
        self.training.message = (
            f"specialist {special:.3f} vs in-context {context if context is None else round(context, 3)} mean Dice "
            f"on {len(val_ids)} validation images: {'specialist' if self.training.in_charge else 'in-context'} drafts"
        )
        self.training.history.append(
            {"run": self.training.run, "images": self.training.images, "specialist": special, "incontext": context}
        )
        # the latest comparison decides: a run that loses hands the drafting back to the in-context engine
        self.specialist = specialist if self.training.in_charge else None

    def _progress(self) -> None:
        if self.training.run is None:
            return
        record = self._run_dir(self.training.run) / "model" / "train.json"
        with contextlib.suppress(OSError, ValueError):  # not written yet, or being replaced
            self.training.epochs_done = int(json.loads(record.read_text()).get("epochs", 0))

    def _load_specialist(self, folder: Path) -> None:
        try:
            self.specialist = SpecialistEngine.from_pretrained(folder / "model", self.device)
        except MedsegError:
            self.specialist = None

    def _run_dir(self, run: str) -> Path:
        return self.workspace.state_dir / SPECIALIST_DIR / run

    def _read_status(self) -> TrainingStatus:
        try:
            return TrainingStatus(**json.loads(self._status_path.read_text()))
        except (OSError, ValueError, TypeError):
            return TrainingStatus()

    def _write_status(self) -> None:
        self._status_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self._status_path, asdict(self.training))


def _stage(supports: int) -> int:
    """The support set's size stage (doubling): the decoder's choice is made once per stage."""
    return int(np.log2(supports))


def mean_dice(pred: np.ndarray, truth: np.ndarray, values: list[int]) -> float:
    """Mean over ``values`` of the Dice of ``pred == v`` against ``truth == v`` (1 where both are empty)."""
    return float(np.mean([dice(pred == v, truth == v) for v in values])) if values else 1.0
