"""Running ``medseg`` commands in-process in tests, and the one-line error contract they check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from medseg.cli.main import app

runner = CliRunner()


def run_cli(*args: str | Path) -> Any:
    """``medseg ARGS...`` through typer's test runner; the result has ``exit_code``, ``stdout``, ``stderr``."""
    return runner.invoke(app, [str(a) for a in args])


def assert_one_error_line(result: Any, *fragments: str) -> None:
    """Exit status 2 and exactly one ``medseg: error: ...`` line on stderr holding every fragment."""
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("medseg: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
