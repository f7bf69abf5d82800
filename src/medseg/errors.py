"""Errors a user can cause: the CLI turns them into one line on stderr and exit status 2."""

from __future__ import annotations

from pathlib import Path


class MedsegError(Exception):
    """A problem with the user's input (file, folder, option), not a bug.

    ``str(error)`` is one line of the form ``"<path>: <problem>"`` when a path is known.
    """

    def __init__(self, problem: str, path: str | Path | None = None) -> None:
        self.problem = problem
        self.path = None if path is None else Path(path)
        super().__init__(problem if path is None else f"{path}: {problem}")


class MedsegNotice(UserWarning):
    """Something medseg did to an input on the user's behalf (rounded near-integer labels, dropped an axis of
    size 1): a `warnings` category, which the CLI prints as one ``medseg: note: <path>: <what>`` line."""


def notice(what: str, path: str | Path | None = None) -> None:
    """Tell the user (through `warnings`, category `MedsegNotice`) what was done to an input and why."""
    import warnings

    warnings.warn(MedsegNotice(what if path is None else f"{path}: {what}"), stacklevel=2)
