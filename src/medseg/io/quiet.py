"""Silence what C libraries (ITK, GDCM, MetaIO, nifticlib) print straight to stderr.

medseg reports each problem as one line of its own; the libraries' multi-line messages are kept
and returned so that the useful part can go into that line.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Redirect file descriptor 2 while the block runs; the list receives the captured lines after it."""
    lines: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (e.g. some embedded interpreters): nothing to silence
        yield lines
        return
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(ln.strip() for ln in sink.read().decode(errors="replace").splitlines() if ln.strip())
