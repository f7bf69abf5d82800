"""`check_dataset`: every case readable, images and labels on the same grid, labels as declared."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.data.dataset import Case, Dataset
from medseg.data.label_files import label_value_problem, read_label
from medseg.errors import MedsegError
from medseg.io import Image, load
from medseg.io.image import label_array


@dataclass(frozen=True)
class Problem:
    """One problem found in a dataset: which case, which file, what is wrong."""

    case: str
    path: Path
    problem: str


@dataclass
class CheckReport:
    """What `check_dataset` found: problems, and label voxel counts over all readable labels."""

    cases: int
    problems: list[Problem] = field(default_factory=list)
    label_voxels: Counter[int] = field(default_factory=Counter)
    dimensions: Counter[int] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_dataset(dataset: Dataset, on_case: Callable[[Case], None] | None = None) -> CheckReport:
    """Check every case of ``dataset``; ``on_case`` is called after each (for progress bars).

    Checks: the label file exists and every file reads; images hold no NaN/inf and are not constant;
    the number of channels matches ``channel_names``; every channel file and the label share one grid
    (shape, spacing, origin, direction); label values are integers among the declared ones; the case
    count matches ``numTraining``; no label file lacks its image.
    """
    report = CheckReport(cases=len(dataset.cases))
    declared = set(dataset.label_names())
    if dataset.declared_cases is not None and dataset.declared_cases != len(dataset.cases):
        report.problems.append(
            Problem(
                "-",
                dataset.root / "dataset.json",
                f"numTraining is {dataset.declared_cases} but {len(dataset.cases)} cases were found",
            )
        )
    for path, problem in dataset.layout_problems:
        report.problems.append(Problem(path.name, path, problem))
    for orphan in dataset.orphan_labels:
        report.problems.append(Problem(orphan.name, orphan, "label file has no image"))
    if not dataset.cases:
        report.problems.append(Problem("-", dataset.root, "dataset holds no cases"))
    for case in dataset.cases:
        report.problems.extend(_check_case(case, dataset, declared, report))
        if on_case is not None:
            on_case(case)
    return report


def _check_case(case: Case, dataset: Dataset, declared: set[int], report: CheckReport) -> Iterator[Problem]:
    images: list[Image] = []
    for path in case.images:
        try:
            image = load(path)
        except MedsegError as err:
            yield Problem(case.name, path, err.problem)
            continue
        images.append(image)
        yield from (Problem(case.name, path, p) for p in _image_problems(image))
    if dataset.channel_names and len(images) == len(case.images):
        found = sum(im.channels for im in images)
        if found != len(dataset.channel_names):
            yield Problem(
                case.name, case.images[0], f"{found} channels but dataset.json declares {len(dataset.channel_names)}"
            )
    if case.label is None:
        yield Problem(case.name, case.images[0], "no label file for this image")
        return
    try:
        label = read_label(case.label, images[0] if images else None, declared)
    except MedsegError as err:
        yield Problem(case.name, case.label, err.problem)
        return
    report.dimensions[label.ndim] += 1
    for image in images:
        if image.shape != label.shape:
            yield Problem(case.name, case.label, f"shape {label.shape} differs from image shape {image.shape}")
        elif not image.geometry.matches(label.geometry):
            yield Problem(
                case.name,
                case.label,
                f"geometry differs from image: {label.geometry.describe_difference(image.geometry)}",
            )
    yield from (Problem(case.name, case.label, p) for p in _label_problems(label, declared, report))


def _image_problems(image: Image) -> Iterator[str]:
    array = image.array
    if array.dtype.kind == "f":
        bad = int((~np.isfinite(array)).sum())
        if bad:
            yield f"image holds {bad} NaN/inf values"
            return
    low, high = array.min(), array.max()
    if low == high:
        yield f"image is empty (every value is {low})"


def _label_problems(label: Image, declared: set[int], report: CheckReport) -> Iterator[str]:
    if label.channels > 1:
        yield f"label map has {label.channels} channels (an RGB mask?); expected one integer channel"
        return
    array = label.array
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            yield "label map holds NaN/inf values"
            return
        try:
            array = label_array(array, label.meta.get("path"))  # near-integers rounded, with a notice
        except MedsegError as err:
            yield err.problem
            return
    values, counts = np.unique(array, return_counts=True)
    report.label_voxels.update({int(v): int(c) for v, c in zip(values, counts, strict=True)})
    if declared:
        problem = label_value_problem(values.tolist(), declared)
        if problem:
            yield problem
    elif values.min() < 0:
        yield f"label map holds negative values (min {values.min()})"


def require_valid(dataset: Dataset) -> None:
    """Raise MedsegError naming the dataset and its first problem when `check_dataset` finds any (training and
    planning start only from data that passes ``medseg dataset check``)."""
    report = check_dataset(dataset)
    if not report.ok:
        first = report.problems[0]
        count = f"{len(report.problems)} problem{'s' if len(report.problems) > 1 else ''}"
        raise MedsegError(
            f"dataset fails 'medseg dataset check' ({count}; first: {first.path.name}: {first.problem})", dataset.root
        )
