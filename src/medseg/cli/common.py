"""What every command shares: user errors as one line with exit status 2, device checks, consoles, progress bars."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console

from medseg.errors import MedsegError
from medseg.runtime import check_device as check_device  # the commands' --device check

F = TypeVar("F", bound=Callable[..., Any])
# The --output-format of the commands that write label maps (medseg.io.formats.OUTPUT_FORMATS, checked there).
OUTPUT_FORMAT_HELP = (
    "auto (the input's format; NIfTI for DICOM input), nifti (.nii.gz for every input) or dicom-seg (a DICOM-SEG "
    "<case>.dcm referencing the input DICOM series; DICOM input only)."
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def user_errors(func: F) -> F:
    """Turn a `MedsegError` into ``medseg: error: <path>: <problem>`` on stderr and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MedsegError as error:
            fail(str(error))

    return wrapper  # type: ignore[return-value]


def cpu_only(device: str, command: str) -> None:
    """Refuse a usable ``device`` other than the CPU for a ``command`` whose trainer runs on the CPU only.

    Raises:
        MedsegError: as `check_device`, or ``device`` is not ``cpu``.
    """
    if check_device(device) != "cpu":
        raise MedsegError(f"--device {device}: {command} trains on the CPU only for now (use --device cpu)")


def fail(message: str) -> None:
    """Print one error line and exit with status 2."""
    err.print(f"medseg: error: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(2)


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr (shown on a terminal for runs of more than one item)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    disable = total <= 1 or not sys.stderr.isatty()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True, disable=disable) as progress:
        task = progress.add_task(description, total=total)
        yield lambda *_: progress.advance(task)


@contextmanager
def slice_progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr (a terminal only) over the slices of one volume, called with ``(z, depth)``
    after each slice; its total is the depth the first call gives."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True, disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task(description, total=None)

        def advance(_z: int, depth: int) -> None:
            progress.update(task, total=depth, advance=1)

        yield advance


@contextmanager
def case_progress(description: str, total: int, every: float = 30.0) -> Iterator[Callable[[bool], None]]:
    """Progress of a batch run on stderr, called with ``failed`` per case: a bar with cases done, failed and
    the rate on a terminal; elsewhere (a log file, a cluster's job output) one line every ``every`` seconds."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    started = last = time.perf_counter()
    counts = {"done": 0, "failed": 0}
    tty = sys.stderr.isatty()

    def line() -> str:
        rate = (counts["done"] + counts["failed"]) / max(time.perf_counter() - started, 1e-9)
        return f"{counts['done'] + counts['failed']}/{total} cases, {counts['failed']} failed, {rate:.2f} cases/s"

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed"),
        TextColumn("{task.fields[rate]} cases/s"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=True, disable=not tty or total <= 1) as progress:
        task = progress.add_task(description, total=total, failed=0, rate="-")

        def advance(failed: bool) -> None:
            nonlocal last
            counts["failed" if failed else "done"] += 1
            rate = (counts["done"] + counts["failed"]) / max(time.perf_counter() - started, 1e-9)
            progress.update(task, advance=1, failed=counts["failed"], rate=f"{rate:.2f}")
            if not tty and time.perf_counter() - last >= every:
                err.print(f"{description}: {line()}", markup=False, soft_wrap=True)
                last = time.perf_counter()

        yield advance
