"""``medseg``: the console script. Commands import their heavy dependencies when they run."""

from __future__ import annotations

import typer

from medseg import __version__
from medseg.cli import (
    dataset_cmd,
    evaluate_cmd,
    finetune_cmd,
    incontext_cmd,
    info_cmd,
    plan_cmd,
    predict_cmd,
    prompt_cmd,
    serve_cmd,
    train_cmd,
    train_head_cmd,
    train_incontext_cmd,
)

app = typer.Typer(
    name="medseg",
    help="Medical image segmentation: prompt, train, predict, inspect, check and score 2D/3D segmentations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("info")(info_cmd.info)
app.command("evaluate")(evaluate_cmd.evaluate)
app.command("prompt")(prompt_cmd.prompt)
app.command("finetune-prompt")(finetune_cmd.finetune_prompt)
app.command("plan")(plan_cmd.plan)
app.command("train")(train_cmd.train)
app.command("predict")(predict_cmd.predict)
app.command("incontext")(incontext_cmd.incontext)
app.command("train-incontext")(train_incontext_cmd.train_incontext)
app.command("train-matching-head")(train_head_cmd.train_matching_head)
app.command("serve")(serve_cmd.serve)
app.add_typer(dataset_cmd.app, name="dataset")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"medseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Medical image segmentation toolkit."""


def _show_notices() -> None:
    """`medseg.errors.MedsegNotice` warnings become ``medseg: note: ...`` lines on stderr (each once)."""
    import sys
    import warnings

    from medseg.errors import MedsegNotice

    shown = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
        if issubclass(category, MedsegNotice):
            sys.stderr.write(f"medseg: note: {message}\n")
        else:
            shown(message, category, *args, **kwargs)  # type: ignore[arg-type]

    warnings.showwarning = show
    warnings.simplefilter("default", MedsegNotice)


def main() -> None:
    """Console-script entry: usage errors too become one ``medseg: error:`` line with exit status 2."""
    import sys

    from typer.exceptions import TyperException

    from medseg.errors import MedsegError
    from medseg.runtime import choose_threads, tune_allocator

    tune_allocator()  # before the first tensor: freed memory is reused, not unmapped (see medseg.runtime)
    try:
        choose_threads()  # before torch is imported: busy cores get fewer threads
    except MedsegError as err:
        sys.stderr.write(f"medseg: error: {err}\n")
        sys.exit(2)
    _show_notices()
    try:
        code = app(standalone_mode=False)
    except TyperException as err:  # bad options or arguments (typer's click exceptions)
        ctx = getattr(err, "ctx", None)
        if type(err).__name__ == "NoArgsIsHelpError" and ctx is not None:
            sys.stdout.write(ctx.get_help() + "\n")
            sys.exit(0)
        where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        sys.stderr.write(f"medseg: error: {err.format_message()}{where}\n")
        code = 2
    except typer.Exit as done:
        code = done.exit_code
    except typer.Abort:
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
