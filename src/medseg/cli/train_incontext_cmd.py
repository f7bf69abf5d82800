"""``medseg train-incontext DATASET... -o DIR``: episodic training of the in-context network."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from medseg.cli.common import cpu_only, err, out, user_errors
from medseg.errors import MedsegError


@user_errors
def train_incontext(
    datasets: list[Path] = typer.Argument(
        ..., metavar="DATASET...", help="Labelled dataset folders to draw tasks from."
    ),
    output: Path = typer.Option(..., "-o", "--output", help="Run folder (config, checkpoint, weights.pt, curve)."),
    config_file: Path | None = typer.Option(None, "--config", help="JSON config (see InContextTrainConfig)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs (each iterations_per_epoch batches)."),
    minutes: float | None = typer.Option(None, "--minutes", help="Training-time budget in minutes."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for tasks, augmentation and initialisation."),
    cache: Path | None = typer.Option(None, "--cache", help="Folder for cached slice banks (default OUTPUT/cache)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUTPUT from its last checkpoint."),
    device: str = typer.Option("cpu", "--device", help="cpu (cuda and mps: not yet, this trainer runs on the CPU)."),
) -> None:
    """Train a UniverSeg-style network on episodes drawn from labelled datasets (in-context learning)."""
    from medseg.engine.incontext import InContextTrainConfig
    from medseg.engine.incontext import train_incontext as run
    from medseg.io.paths import check_output

    cpu_only(device, "train-incontext")
    check_output(output)
    data: dict[str, Any] = {}
    if config_file is not None:
        if not config_file.is_file():
            raise MedsegError("no such file", config_file)
        try:
            data = json.loads(config_file.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as error:
            raise MedsegError(f"config is not valid JSON ({error})", config_file) from None
    if resume and (output / "config.json").is_file():
        data = json.loads((output / "config.json").read_text())
    data["datasets"] = [str(d) for d in datasets]
    for key, value in (("epochs", epochs), ("minutes", minutes), ("seed", seed)):
        if value is not None:
            data[key] = value
    for d in datasets:
        if not d.is_dir():
            raise MedsegError("no such dataset folder", d)
    try:
        config = InContextTrainConfig.from_dict(data)
    except TypeError as error:
        raise MedsegError(f"invalid config: {error}", config_file) from None

    def report(record: dict[str, Any]) -> None:
        err.print(f"epoch {record['epoch']}: loss {record['loss']:.4f}, validation Dice {record['val_mean_dice']:.3f} "
                  f"({record['seconds']:.0f} s)", markup=False)  # fmt: skip

    last = run(config, output, cache_dir=cache or output / "cache", resume=resume, on_epoch=report)
    out.print(f"weights in {output / 'weights.pt'} (last epoch: {last})", soft_wrap=True)
