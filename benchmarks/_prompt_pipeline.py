"""Sections of ``benchmarks/prompt.py`` that compare medseg's whole prompt pipeline with LiteMedSAM's own.

``agreement``: raw image and tight ground-truth boxes in, masks out, through medseg (`segment_logits`) and
through the reference pipeline (``_reference_pipeline.py``, the official model, in the reference Python):
Dice of each with the ground truth and between the two. 2D datasets: every label on ``count`` images;
3D sources (`_volumes`): a tight box on up to ``slices`` slices of each structure.

``volumes``: one 3D box per structure (its ground-truth 3D bounding box) against (a) the projected box:
the 3D box's x/y extent on every slice of its z range, (b) a tight ground-truth box on every slice holding
the structure, and LiteMedSAM's 3D scheme (the reference script's propagation, run in-process with
medseg's model and inputs, which equal the reference's: see ``agreement``).
"""

from __future__ import annotations

import subprocess
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from _volumes import Structure

from medseg.inference.prompt_predictor import PromptPredictor, clip_to_box
from medseg.inference.prompt_session import Prompts, model_input, segment_logits
from medseg.inference.propagation import bounding_box
from medseg.io import Image
from medseg.metrics import dice

REFERENCE_PIPELINE = Path(__file__).resolve().parent / "_reference_pipeline.py"
Row = dict[str, object]


def run_reference(python: str, given: dict[str, np.ndarray], threads: int) -> dict[str, np.ndarray]:
    """``_reference_pipeline.py`` on ``given`` in ``python``; its outputs (SystemExit with its last line on failure)."""
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "in.npz", Path(folder) / "out.npz"
        np.savez(source, **given)  # type: ignore[arg-type]
        command = [python, str(REFERENCE_PIPELINE), str(source), str(target), "--threads", str(threads)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"reference pipeline failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        with np.load(target) as produced:
            return {key: produced[key] for key in produced.files}


def agreement_2d(
    predictor: PromptPredictor, drawn: list[tuple[Image, np.ndarray, str]], labels: list[int], python: str, threads: int
) -> dict[int, list[tuple[float, float, float]]]:
    """Per label: (medseg Dice, reference Dice, agreement Dice) for each image holding it."""
    given: dict[str, np.ndarray] = {"kind": np.asarray("2d")}
    ours: list[list[tuple[int, np.ndarray, np.ndarray]]] = []
    for index, (image, truth, _case) in enumerate(drawn):
        present = [v for v in labels if (truth == v).any()]
        boxes = [bounding_box(truth == v) for v in present]
        logits = segment_logits(predictor, image, Prompts(boxes=boxes))
        ours.append([(v, one > 0, truth == v) for v, one in zip(present, logits, strict=True)])
        given[f"image_{index}"] = np.asarray(image.array)
        given[f"boxes_{index}"] = np.asarray(boxes, np.float32)
    produced = run_reference(python, given, threads)
    scores: dict[int, list[tuple[float, float, float]]] = defaultdict(list)
    for index, objects in enumerate(ours):
        for k, (value, mine, truth) in enumerate(objects):
            theirs = produced[f"masks_{index}"][k] > 0
            scores[value].append((dice(mine, truth), dice(theirs, truth), dice(mine, theirs)))
    return scores


def agreement_volume(
    predictor: PromptPredictor, group: list[Structure], slices: int, python: str, threads: int
) -> list[tuple[float, float, float]]:
    """(medseg, reference, agreement) Dice on up to ``slices`` evenly spaced slices of each structure (tight box)."""
    image = group[0].image
    shown = model_input(image)
    kind = "ct" if str(image.meta.get("modality", "")).upper() == "CT" else "mr"
    rows, truths, ours = [], [], []
    for structure in group:
        present = np.flatnonzero(structure.truth.any(axis=(1, 2)))
        for z in present[np.linspace(0, len(present) - 1, min(slices, len(present))).round().astype(int)]:
            truth = structure.truth[z]
            box = bounding_box(truth)
            predictor.set_image(shown[z])
            ours.append(predictor.predict(boxes=[list(box)]).masks[0])
            rows.append([float(z), *box])
            truths.append(truth)
    given = {"kind": np.asarray(kind), "volume": np.asarray(image.array), "boxes": np.asarray(rows, np.float32)}
    produced = run_reference(python, given, threads)["masks"] > 0
    return [(dice(m, t), dice(r, t), dice(m, r)) for m, r, t in zip(ours, produced, truths, strict=True)]


def box3d(mask: np.ndarray) -> tuple[float, float, float, float, float, float]:
    """``x0, y0, z0, x1, y1, z1`` of a 3D mask: x/y in pixel edges (exclusive end), z inclusive."""
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    rows = np.flatnonzero(mask.any(axis=(0, 2)))
    cols = np.flatnonzero(mask.any(axis=(0, 1)))
    return (float(cols[0]), float(rows[0]), float(zs[0]), float(cols[-1] + 1), float(rows[-1] + 1), float(zs[-1]))


class Slices:
    """The model inputs of one volume, embedded once per slice (the predictor's cache, keyed by ``key``)."""

    def __init__(self, predictor: PromptPredictor, image: Image, key: str) -> None:
        self.predictor, self.image, self.key = predictor, image, key
        self.shown = model_input(image)

    def decode(self, z: int, box: Iterable[float]) -> tuple[np.ndarray, float]:
        box = [float(v) for v in box]
        self.predictor.set_image(self.shown[z], key=(self.key, z))
        result = self.predictor.predict(boxes=[box])
        return clip_to_box(result.logits[0], box) > 0, float(result.scores[0])


def projected_box(volume: Slices, box: tuple[float, ...]) -> np.ndarray:
    x0, y0, z0, x1, y1, z1 = box
    out = np.zeros(volume.shown.shape[:3], bool)
    for z in range(int(z0), int(z1) + 1):
        out[z] = volume.decode(z, (x0, y0, x1, y1))[0]
    return out


def box_per_slice(volume: Slices, truth: np.ndarray) -> np.ndarray:
    out = np.zeros(truth.shape, bool)
    for z in np.flatnonzero(truth.any(axis=(1, 2))):
        out[z] = volume.decode(int(z), bounding_box(truth[z]))[0]
    return out


def litemedsam_scheme(volume: Slices, box: tuple[float, ...]) -> np.ndarray:
    """The reference script's 3D propagation: the middle slice from the box, then each slice from the box of
    its neighbour's mask widened by 3 pixels of the 256 frame (the user's box where that mask is empty)."""
    x0, y0, z0, x1, y1, z1 = box
    first, last = int(z0), int(z1)
    user = (x0, y0, x1, y1)
    out = np.zeros(volume.shown.shape[:3], bool)
    height, width = out.shape[1:]
    shift = 3 * max(height, width) / volume.predictor.spec.image_size
    middle = int((last - first) / 2 + first)
    for order in (range(middle, last + 1), range(middle - 1, first - 1, -1)):
        for z in order:
            neighbour = out[z - 1] if order.step == 1 else out[z + 1]
            if z == middle or not neighbour.any():
                prompt = user
            else:
                a, b, c, d = bounding_box(neighbour)
                prompt = (max(0, a - shift), max(0, b - shift), min(width, c + shift), min(height, d + shift))
            mask = volume.decode(z, prompt)[0]
            out[z] = mask
    return out


def medseg_3d(volume: Slices, box: tuple[float, ...]) -> np.ndarray:
    logits = segment_logits(volume.predictor, volume.image, Prompts(boxes3d=[box]), key=volume.key)
    return logits[0] > 0


def medseg_3_planes(volume: Slices, box: tuple[float, ...]) -> np.ndarray:
    prompts = Prompts(boxes3d=[box], planes=3)  # type: ignore[list-item]
    return segment_logits(volume.predictor, volume.image, prompts, key=volume.key)[0] > 0


METHODS: dict[str, Callable[[Slices, tuple[float, ...]], np.ndarray]] = {
    "projected box (a)": projected_box,
    "LiteMedSAM 3D scheme": litemedsam_scheme,
    "medseg 3D box": medseg_3d,
    "medseg 3 planes": medseg_3_planes,
}


def score_structure(predictor: PromptPredictor, structure: Structure, volume: Slices) -> Row:
    """Dice of every method on one structure, and whether medseg left the box's empty slices empty."""
    box = box3d(structure.truth)
    row: Row = {"source": structure.source, "group": structure.group, "case": structure.case}
    row["box per slice (b)"] = dice(box_per_slice(volume, structure.truth), structure.truth)
    for name, method in METHODS.items():
        found = method(volume, box)
        row[name] = dice(found, structure.truth)
        if name in ("medseg 3D box", "medseg 3 planes"):
            suffix = "" if name == "medseg 3D box" else " (3 planes)"
            span = range(int(box[2]), int(box[5]) + 1)
            empty = [z for z in span if not structure.truth[z].any()]
            row["empty slices"] = len(empty)
            row["empty kept" + suffix] = sum(not found[z].any() for z in empty)
    return row
