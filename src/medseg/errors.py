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
