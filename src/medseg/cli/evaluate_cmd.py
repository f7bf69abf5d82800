"""``medseg evaluate PRED GT -o DIR``: DSC, NSD and HD95 per case and label, with a summary and figure."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from medseg.cli.common import out, progress_bar, user_errors
from medseg.errors import MedsegError

if TYPE_CHECKING:
    from medseg.evaluation import Evaluation


@user_errors
def evaluate(
    pred: Path = typer.Argument(..., metavar="PRED", help="Predicted label map, or a folder of them named by case."),
    gt: Path = typer.Argument(
        ..., metavar="GT", help="Ground-truth label map, or a folder (e.g. a dataset's labelsTr)."
    ),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for metrics.csv, summary.json, evaluation.png."),
    labels: str | None = typer.Option(
        None, "--labels", help="Label values to score, e.g. '1,2' (default: dataset.json's, else all found)."
    ),
    tolerance_mm: float = typer.Option(2.0, "--tolerance-mm", min=0.0, help="NSD tolerance in mm."),
    dataset_json: Path | None = typer.Option(
        None, "--dataset-json", help="Label names and values (default: dataset.json in or above GT)."
    ),
    images: Path | None = typer.Option(
        None, "--images", help="Images to draw overlays on (default: imagesTr beside a labelsTr GT)."
    ),
    predicted_only: bool = typer.Option(
        False, "--predicted-only", help="Score only the GT cases that have a prediction (default: all must)."
    ),
) -> None:
    """Score predictions against ground truth (files paired by case name, geometry must agree)."""
    from medseg.data import find_dataset_json, label_names_of, read_dataset_json
    from medseg.evaluation import evaluate_pairs, pair_cases, write_report

    _check_output(output, (pred, gt, *((images,) if images else ())))
    if images is not None and not images.is_dir():
        raise MedsegError("--images must be a folder of images named by case", images)
    pairs = pair_cases(pred, gt, predicted_only)
    json_path = dataset_json or find_dataset_json(gt if gt.is_dir() else gt.parent)
    names: dict[int, str] = {}
    if json_path is not None:
        names = label_names_of(read_dataset_json(json_path))
    declared = set(names) if names else None
    chosen = _parse_labels(labels, names, json_path)
    if chosen is None and names:
        chosen = {v: n for v, n in sorted(names.items()) if v != 0}
    with progress_bar("evaluating", len(pairs)) as advance:
        evaluation = evaluate_pairs(pairs, chosen, declared, tolerance_mm, on_case=advance)
    written = write_report(evaluation, output, _image_finder(images, gt))
    _print_summary(evaluation)
    out.print("wrote " + ", ".join(str(p) for p in written))


def _parse_labels(text: str | None, names: dict[int, str], json_path: Path | None) -> dict[int, str] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise MedsegError(f"--labels must be integers separated by commas, got '{text}'") from None
    if not values or any(v <= 0 for v in values):
        raise MedsegError(f"--labels must list foreground values (> 0), got '{text}'")
    for v in values:
        if names and v not in names:
            raise MedsegError(f"label {v} is not in the dataset's labels {sorted(names)}", json_path)
    return {v: names.get(v, f"label_{v}") for v in values}


def _check_output(output: Path, inputs: tuple[Path, ...]) -> None:
    from medseg.evaluation.report import OUTPUT_NAMES
    from medseg.io.paths import check_output

    target = output.resolve()
    written = {target / name for name in OUTPUT_NAMES}
    for p in inputs:
        if p.is_file() and p.resolve() in written:
            raise MedsegError(f"writing {p.name} into {output} would overwrite this input", p)
        if p.exists() and target == p.resolve():
            raise MedsegError("output folder is an input; choose another -o", output)
        if p.is_dir() and target.is_relative_to(p.resolve()):
            raise MedsegError(f"output folder is inside the input folder {p}; choose another -o", output)
    if output.exists() and not output.is_dir():
        raise MedsegError("output exists and is not a folder", output)
    check_output(output)


def _image_finder(images: Path | None, gt: Path) -> Callable[[str], Path | None] | None:
    from medseg.io.formats import case_of, is_image_file

    folder = images
    labels_dir = gt if gt.is_dir() else gt.parent
    if folder is None and labels_dir.name.startswith("labels"):
        sibling = labels_dir.parent / labels_dir.name.replace("labels", "images", 1)
        folder = sibling if sibling.is_dir() else None
    if folder is None or not folder.is_dir():
        return None
    by_case: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if is_image_file(p):
            by_case.setdefault(case_of(p), p)
    return by_case.get


def _print_summary(evaluation: Evaluation) -> None:
    from rich.table import Table

    summary: dict[str, Any] = evaluation.summary()
    table = Table(title=f"{summary['cases']} cases, NSD tolerance {evaluation.tolerance_mm:g} mm")
    for column in ("label", "name", "Dice mean", "Dice median", "NSD mean", "HD95 mean (mm)", "n"):
        table.add_column(column, justify="left" if column == "name" else "right")
    for value, stats in summary["labels"].items():
        table.add_row(
            value,
            stats["name"],
            f"{stats['dice']['mean']:.4f}",
            f"{stats['dice']['median']:.4f}",
            f"{stats['nsd']['mean']:.4f}",
            f"{stats['hd95_mm']['mean']:.2f}",
            str(stats["dice"]["count"]),
        )
    out.print(table)
