"""``OUT/manifest.csv`` of a batch prediction: one row per input case, and the model hash that makes a run resumable.

Columns: ``path`` (the case's input files, absolute, ``;`` between channels), ``output`` (its label map,
absolute), ``status`` (``done``, ``failed``, or ``pending``: listed when the run started, not done yet),
``seconds`` (wall time of the case on its worker), ``error`` (the one-line reason of a failed case, else empty)
and ``model`` (a `case_hash` of what predicted it: the weights, the options, for in-context the support set,
for prompts the case's boxes, and the size, modification time and inode of the case's input files). The file is
always replaced whole and atomically, so a reader never sees half a row and no input is listed twice.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from medseg.engine.run_files import atomic_write
from medseg.errors import MedsegError

MANIFEST = "manifest.csv"
COLUMNS = ("path", "output", "status", "seconds", "error", "model")
DONE, FAILED, PENDING = "done", "failed", "pending"


@dataclass(frozen=True)
class Row:
    """One case of a batch run (see the module's columns)."""

    path: str
    output: str
    status: str
    seconds: float
    error: str
    model: str


def case_key(files: Sequence[Path]) -> str:
    """The ``path`` column of a case: its files made absolute (not resolved: a link stays the name given)."""
    return ";".join(os.path.abspath(f) for f in files)


def model_hash(model_dir: Path, **options: object) -> str:
    """`content_hash` of a ``medseg train`` folder's ``plan.json`` and ``model.pt`` and the ``options`` that change
    the outputs (e.g. ``mirror``, ``output_format``), so a resumed run redoes cases of another model.

    Raises:
        MedsegError: a file cannot be read.
    """
    return content_hash([Path(model_dir) / "plan.json", Path(model_dir) / "model.pt"], **options)


def content_hash(paths: Sequence[Path], **options: object) -> str:
    """16 hex digits of SHA-256 over the bytes of ``paths`` in order (a folder: its files, by relative name) and
    the ``options``: what makes the outputs of a batch run (weights, support sets, settings).

    Raises:
        MedsegError: a file cannot be read.
    """
    digest = hashlib.sha256()
    for path in paths:
        files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
        for file in files:
            if file != Path(path):
                digest.update(file.relative_to(path).as_posix().encode() + b"\0")
            try:
                with open(file, "rb") as f:
                    while chunk := f.read(1 << 20):
                        digest.update(chunk)
            except OSError as error:
                raise MedsegError(f"cannot read ({error.strerror})", file) from None
        digest.update(b"\0")
    digest.update(repr(sorted(options.items())).encode())
    return digest.hexdigest()[:16]


def case_hash(model: str, files: Sequence[Path]) -> str:
    """The ``model`` column of one case: ``model`` (a `content_hash`) and the stamps of the case's input files
    (size, modification time in ns and inode of each; a folder's files, by relative name; a missing file as
    such), so that an input replaced since, even by an older file or a copy with the same time, is done again."""
    stamps: list[str] = []
    for path in files:
        path = Path(path)
        inside = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in inside:
            try:
                info = file.stat()
            except OSError:
                stamps.append(f"{file}:missing")
                continue
            stamps.append(f"{file}:{info.st_size}:{info.st_mtime_ns}:{info.st_ino}")
        stamps.append("")
    return hashlib.sha256("\n".join([model, *stamps]).encode()).hexdigest()[:16]


def read_manifest(path: Path) -> dict[str, Row]:
    """``path`` column -> row of an existing manifest (empty when there is none; the last row of a path wins).

    Raises:
        MedsegError: the file is not a medseg manifest (other columns, unreadable).
    """
    if not path.exists():
        return {}
    try:
        reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig")))
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise MedsegError(f"is not a medseg manifest (columns {', '.join(COLUMNS)}); choose another -o", path)
        return {
            r["path"]: Row(r["path"], r["output"], r["status"], float(r["seconds"] or 0), r["error"], r["model"])
            for r in reader
        }
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as error:
        problem = f"cannot read the manifest ({type(error).__name__}); move it away to start over"
        raise MedsegError(problem, path) from None


def write_manifest(path: Path, rows: Iterable[Row]) -> None:
    """Replace ``path`` with ``rows`` (atomically)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow((row.path, row.output, row.status, f"{row.seconds:.3f}", row.error, row.model))
    atomic_write(path, lambda f: f.write(text.getvalue().encode("utf-8")))
