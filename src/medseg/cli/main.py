"""``medseg``: the console script. Commands import their heavy dependencies when they run."""

from __future__ import annotations

import typer

from medseg import __version__
from medseg.cli import dataset_cmd, evaluate_cmd, info_cmd

app = typer.Typer(
    name="medseg",
    help="Medical image segmentation: read, inspect, check and score 2D/3D segmentations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("info")(info_cmd.info)
app.command("evaluate")(evaluate_cmd.evaluate)
app.add_typer(dataset_cmd.app, name="dataset")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"medseg {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Medical image segmentation toolkit."""


if __name__ == "__main__":
    app()
