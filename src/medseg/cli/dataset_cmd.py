"""``medseg dataset check DIR``: find every problem in a labelled dataset before training on it."""

from __future__ import annotations

from pathlib import Path

import typer

from medseg.cli.common import fail, out, progress_bar, user_errors

app = typer.Typer(
    help="Work with labelled datasets (nnU-Net raw layout or images/ + masks/).",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.command("check")
@user_errors
def check(
    path: Path = typer.Argument(
        ..., metavar="DIR", help="Dataset folder: imagesTr/ + labelsTr/ + dataset.json, or images/ + masks/."
    ),
    max_rows: int = typer.Option(50, help="Show at most this many problems (all are counted)."),
) -> None:
    """Check every case: readable, image and label on one grid, declared labels, no NaN/inf or empty images.

    Exit status 2 when any problem is found.
    """
    from rich.table import Table

    from medseg.data import open_dataset
    from medseg.data.check import check_dataset

    dataset = open_dataset(path)
    with progress_bar(f"checking {dataset.name}", len(dataset.cases)) as advance:
        report = check_dataset(dataset, on_case=advance)
    names = dataset.label_names()
    dims = ", ".join(f"{d}D" for d in sorted(report.dimensions)) or "?"
    out.print(
        f"[bold]{dataset.name}[/bold] ({dataset.layout} layout, {dims}, modality "
        f"'{dataset.modality or '?'}'): {report.cases} cases"
    )
    if report.label_voxels:
        counts = ", ".join(
            f"{v}{' ' + names[v] if v in names else ''}: {c}" for v, c in sorted(report.label_voxels.items())
        )
        out.print(f"label voxels: {counts}")
    if report.ok:
        out.print("[green]no problems found[/green]")
        return
    table = Table(title=f"{len(report.problems)} problems")
    table.add_column("case", overflow="fold")
    table.add_column("file", overflow="fold")
    table.add_column("problem", overflow="fold", ratio=2)
    for problem in report.problems[:max_rows]:
        shown = problem.path.relative_to(path) if problem.path.is_relative_to(path) else problem.path
        table.add_row(problem.case, str(shown), problem.problem)
    out.print(table)
    if len(report.problems) > max_rows:
        out.print(f"... and {len(report.problems) - max_rows} more")
    cases = len({p.case for p in report.problems if p.case != "-"})
    fail(f"{path}: {len(report.problems)} problems" + (f" in {cases} cases" if cases else ""))
