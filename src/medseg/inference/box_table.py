"""Per-case boxes from a CSV file, for ``medseg prompt INPUTS --boxes boxes.csv --batch``.

The file (UTF-8, a byte order mark allowed) starts with a header row naming its columns, in any order and case:

- ``path``: the image (a file, or a DICOM series folder); a relative path is read from the CSV file's folder;
- ``x0``, ``y0``, ``x1``, ``y1``: a box in pixels, x the column and y the row, as ``--box x0,y0,x1,y1``;
- ``z0``, ``z1`` (optional columns): when a row fills both, its box is a 3D box over the slices (array axis 0)
  z0 to z1, both included, as ``--box3d x0,y0,z0,x1,y1,z1``; when it fills neither, a 2D box;
- ``slice`` (optional column): the slice of a volume that a row's 2D box is drawn on, as ``--slice``; the 2D
  boxes of one path share one slice.

Each row is one object; the rows of a path, in their order, are its objects, labelled 1, 2, ... as repeated
``--box`` options are. A path's rows are all 2D boxes or all 3D boxes. Blank lines are skipped.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError
from medseg.inference.prompt_session import Prompts

REQUIRED = ("path", "x0", "y0", "x1", "y1")
OPTIONAL = ("z0", "z1", "slice")
_COLUMNS = f"{', '.join(REQUIRED)}; optional {', '.join(OPTIONAL)}"


@dataclass(frozen=True)
class CaseBoxes:
    """One path's boxes: 2D boxes ``(x0, y0, x1, y1)`` (on ``slice_index`` of a volume) or 3D boxes ``(x0, y0,
    z0, x1, y1, z1)``, in the rows' order; ``line``: the CSV line of the path's first row."""

    boxes: tuple[tuple[float, float, float, float], ...] = ()
    boxes3d: tuple[tuple[float, float, float, float, float, float], ...] = ()
    slice_index: int | None = None
    line: int = field(default=0, compare=False)

    def prompts(self) -> Prompts:
        return Prompts(boxes=list(self.boxes), boxes3d=list(self.boxes3d), slice_index=self.slice_index)


def read_boxes(table: Path) -> dict[Path, CaseBoxes]:
    """Absolute path (not resolved) -> its boxes, in the order the paths first appear.

    Raises:
        MedsegError: naming ``table`` and the line: an unreadable file, no header, a missing, unknown or repeated
            column, a row with too many or too few cells, an empty path, a value that is not a number (an integer
            for ``slice``), only one of ``z0`` and ``z1``, a box that is inverted or empty (``x0 >= x1``, ``y0 >=
            y1``, ``z0 > z1``), a 3D box with a ``slice``, 2D and 3D boxes for one path, two slices for one
            path, no rows.
    """
    try:
        text = table.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise MedsegError(f"cannot read the box list ({type(error).__name__})", table) from None
    reader = csv.reader(io.StringIO(text), strict=True)
    try:
        header, columns = _header(reader, table)
        found: dict[Path, CaseBoxes] = {}
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            line = reader.line_num
            if len(row) != len(header):
                raise _bad(table, line, f"{len(row)} cells for {len(header)} columns")
            values = {name: row[index].strip() for name, index in columns.items()}
            if not values["path"]:
                raise _bad(table, line, "no path")
            path = Path(values["path"]).expanduser()
            path = Path(os.path.abspath(path if path.is_absolute() else table.parent / path))
            found[path] = _add(found.get(path, CaseBoxes(line=line)), values, table, line)
    except csv.Error as error:
        raise _bad(table, reader.line_num, f"not CSV ({error})") from None
    if not found:
        raise MedsegError("no boxes: a header row, then a row per box", table)
    return found


def _header(reader: Any, table: Path) -> tuple[list[str], dict[str, int]]:
    """The header's cells and column name -> index, checked."""
    for row in reader:
        if any(cell.strip() for cell in row):
            header = [cell.strip().lower() for cell in row]
            break
    else:
        raise MedsegError(f"empty: it needs a header row ({_COLUMNS})", table)
    line = reader.line_num
    for name in header:
        if name not in REQUIRED + OPTIONAL:
            raise _bad(table, line, f"unknown column {name!r} (columns: {_COLUMNS})")
        if header.count(name) > 1:
            raise _bad(table, line, f"column {name!r} twice")
    for name in REQUIRED:
        if name not in header:
            raise _bad(table, line, f"no column {name!r} (columns: {_COLUMNS})")
    if ("z0" in header) != ("z1" in header):
        raise _bad(table, line, "a 3D box needs both columns z0 and z1")
    return header, {name: header.index(name) for name in header}


def _add(boxes: CaseBoxes, values: Mapping[str, str], table: Path, line: int) -> CaseBoxes:
    """``boxes`` with the row's box added."""
    x0, y0, x1, y1 = (_number(values[name], name, table, line) for name in ("x0", "y0", "x1", "y1"))
    z = [values.get(name, "") for name in ("z0", "z1")]
    where = f"{values['path']} (line {boxes.line})"
    if any(z):
        if not all(z):
            raise _bad(table, line, "a 3D box needs both z0 and z1")
        if values.get("slice"):
            raise _bad(table, line, "a 3D box takes no slice (z0 and z1 say which)")
        if boxes.boxes:
            raise _bad(table, line, f"a 3D box, but 2D boxes for {where}: give a path all 2D or all 3D boxes")
        z0, z1 = (_number(value, name, table, line) for value, name in zip(z, ("z0", "z1"), strict=True))
        if x0 >= x1 or y0 >= y1 or z0 > z1:
            raise _bad(table, line, f"3D box {_shown((x0, y0, z0, x1, y1, z1))} is inverted or empty")
        return replace(boxes, boxes3d=(*boxes.boxes3d, (x0, y0, z0, x1, y1, z1)))
    if boxes.boxes3d:
        raise _bad(table, line, f"a 2D box, but 3D boxes for {where}: give a path all 2D or all 3D boxes")
    if x0 >= x1 or y0 >= y1:
        raise _bad(table, line, f"box {_shown((x0, y0, x1, y1))} is inverted or empty")
    chosen = _slice(values.get("slice", ""), table, line)
    if boxes.boxes and chosen != boxes.slice_index:
        raise _bad(table, line, f"slice {chosen} for {where}, which has slice {boxes.slice_index}")
    return replace(boxes, boxes=(*boxes.boxes, (x0, y0, x1, y1)), slice_index=chosen)


def _shown(box: Sequence[float]) -> str:
    return "(" + ", ".join(f"{value:g}" for value in box) + ")"


def _number(text: str, name: str, table: Path, line: int) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _bad(table, line, f"{name} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise _bad(table, line, f"{name} {text!r} is not a finite number")
    return value


def _slice(text: str, table: Path, line: int) -> int | None:
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise _bad(table, line, f"slice {text!r} is not a whole number") from None


def _bad(table: Path, line: int, problem: str) -> MedsegError:
    return MedsegError(f"line {line}: {problem}", table)


def boxes_of_cases(
    cases: Mapping[str, Sequence[Path]], table: Path
) -> tuple[dict[str, list[Path]], dict[str, CaseBoxes]]:
    """The cases of a batch prompt run and their boxes (`read_boxes`): ``cases`` (the inputs, one file each),
    and a case for each path of ``table`` that does not exist (segmenting it fails: a failed row, not a refusal).
    A case without a row has no boxes (it fails too).

    Raises:
        MedsegError: as `read_boxes`; a case of two files (channels); a path of ``table`` that exists but is not
            among the inputs, or that does not exist and has the name of another case.
    """
    from medseg.io import case_of

    found = read_boxes(table)
    by_file: dict[Path, str] = {}
    for case, files in cases.items():
        if len(files) > 1:
            raise MedsegError("a second channel of a case; prompts take one image per case", files[1])
        by_file[Path(os.path.abspath(files[0]))] = case
    every = {case: list(files) for case, files in cases.items()}
    boxes: dict[str, CaseBoxes] = {}
    for path, case_boxes in found.items():
        named = by_file.get(path)
        if named is None:
            if path.exists():
                raise _bad(table, case_boxes.line, f"{path} is not among the inputs")
            named = case_of(path)
            if named in every:
                raise _bad(table, case_boxes.line, f"{path} and {every[named][0]} are both case {named}")
            every[named] = [path]
        boxes[named] = case_boxes
    return every, boxes
