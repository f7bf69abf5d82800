"""``medseg train-matching-head DATASET... -o DIR``: train the head of the feature-matching engine."""

from __future__ import annotations

from pathlib import Path

import typer

from medseg.cli.common import cpu_only, err, out, user_errors


@user_errors
def train_matching_head(
    datasets: list[Path] = typer.Argument(..., metavar="DATASET...", help="Labelled dataset folders."),
    output: Path = typer.Option(..., "-o", "--output", help="Run folder (bank.npz, checkpoint.pt, matching_head.pt)."),
    steps: int = typer.Option(800, "--steps", help="Optimiser steps (batches of episodes)."),
    images_per_dataset: int = typer.Option(40, "--images-per-dataset", help="Images embedded per dataset."),
    seed: int = typer.Option(0, "--seed", help="Seed for images, episodes and initialisation."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUTPUT from its last checkpoint."),
    device: str = typer.Option("cpu", "--device", help="cpu (cuda and mps: not yet, this trainer runs on the CPU)."),
) -> None:
    """Train the matching head of `medseg incontext --engine match` on episodes from labelled datasets
    (frozen LiteMedSAM features; every image is embedded once and cached in OUTPUT/bank.npz)."""
    from medseg.engine.incontext.train_head import HeadTrainConfig
    from medseg.engine.incontext.train_head import train_matching_head as run
    from medseg.errors import MedsegError
    from medseg.io.paths import check_output

    cpu_only(device, "train-matching-head")
    if steps < 1 or images_per_dataset < 2:
        raise MedsegError("--steps must be at least 1 and --images-per-dataset at least 2")
    if output.exists() and not output.is_dir():
        raise MedsegError("exists and is not a folder", output)
    check_output(output)
    for folder in datasets:
        if not folder.is_dir():
            raise MedsegError("no such dataset folder", folder)
    config = HeadTrainConfig(
        datasets=[str(d) for d in datasets], images_per_dataset=images_per_dataset, steps=steps, seed=seed
    )

    def report(step: int, loss: float) -> None:
        if step % 25 == 0 or step == steps:
            err.print(f"step {step}/{steps}: loss {loss:.4f}", markup=False)

    weights = run(config, output, resume, report)
    out.print(f"matching head in {weights} (medseg incontext --engine match --head {weights} ...)", soft_wrap=True)
