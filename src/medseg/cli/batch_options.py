"""``--batch``, ``--ray``, ``--ray-address`` and ``--workers`` of ``medseg predict``, ``incontext`` and ``prompt``:
the options, and the run with its progress, summary and exit status (`medseg.engine.batch`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from medseg.cli.common import case_progress, err, out
from medseg.errors import MedsegError

if TYPE_CHECKING:
    from medseg.engine.batch import CaseRunner

BATCH = typer.Option(
    False,
    "--batch",
    help="Case by case: each label map written when done, OUT/manifest.csv, a bad case a failed row (exit 1), "
    "a second run skips what is done.",
)
RAY = typer.Option(False, "--ray", help="As --batch, on Ray (the ray extra of medseg); a local Ray by default.")
RAY_ADDRESS = typer.Option(
    None, "--ray-address", help="A running Ray cluster (ray start --head prints it; 'auto'); implies --ray."
)
WORKERS = typer.Option(None, "--workers", min=1, help="Ray workers, one CPU each (default all).")


def batch_mode(batch: bool, use_ray: bool, ray_address: str | None, workers: int | None) -> tuple[bool, bool]:
    """(case by case, on Ray) from the options: ``--ray-address`` implies ``--ray``, which implies ``--batch``.

    Raises:
        MedsegError: ``--workers`` without Ray.
    """
    use_ray = use_ray or ray_address is not None
    if workers is not None and not use_ray:
        raise MedsegError("--workers sets the Ray workers: add --ray")
    return batch or use_ray, use_ray


def run_batch_command(
    runner: CaseRunner,
    cases: dict[str, list[Path]],
    output: Path,
    use_ray: bool,
    ray_address: str | None,
    workers: int | None,
    description: str = "predicting",
) -> None:
    """Run ``runner`` on ``cases`` with a progress display, print the summary, exit 1 when a case failed.

    Raises:
        MedsegError: as `medseg.engine.batch.run_batch`, before any work.
    """
    from medseg.engine.batch import run_batch
    from medseg.engine.manifest import FAILED, MANIFEST

    with case_progress(description, len(cases)) as advance:
        result = run_batch(
            runner,
            cases,
            output,
            use_ray=use_ray,
            ray_address=ray_address,
            workers=workers,
            on_row=lambda row: advance(row.status == FAILED),
        )
    ran = result.done + result.failed
    rate = f", {ran / result.seconds:.2f} cases/s" if ran and result.seconds > 0 else ""
    skipped = f", {result.skipped} done before" if result.skipped else ""
    out.print(
        f"{result.done} label map(s) in {output}, {result.failed} failed{skipped} of {len(cases)} case(s)"
        f" ({result.seconds:.1f} s{rate}); {output / MANIFEST}",
        soft_wrap=True,
    )
    if result.failed:
        err.print(
            f"medseg: {result.failed} of {len(cases)} case(s) failed: their errors are in {output / MANIFEST}",
            markup=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)
