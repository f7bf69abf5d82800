"""`medseg.inference.box_table`: per-case boxes from a CSV (``medseg prompt --boxes``), its one-line refusals naming
the file and the line, and how its paths meet the inputs' cases."""

from __future__ import annotations

from pathlib import Path

import pytest

from medseg.errors import MedsegError
from medseg.inference.box_table import CaseBoxes, boxes_of_cases, read_boxes


def write(path: Path, text: str, bom: bool = False) -> Path:
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    return path


def test_rows_become_each_paths_objects_in_order(tmp_path: Path) -> None:
    table = write(
        tmp_path / "boxes.csv",
        "Path,X0,Y0,X1,Y1,z0,z1,slice\n"
        "a.png,1,2,30,40,,,\n"
        "\n"
        "vol.nii.gz,1,2,3,4,0,5,\n"
        "a.png,5,6,7,8,,,\n"
        f"{tmp_path / 'sub' / 'b.nii.gz'},1,1,9,9,,,3\n",
        bom=True,  # as Excel writes "CSV UTF-8"
    )
    found = read_boxes(table)
    assert list(found) == [tmp_path / "a.png", tmp_path / "vol.nii.gz", tmp_path / "sub" / "b.nii.gz"]
    assert found[tmp_path / "a.png"] == CaseBoxes(boxes=((1, 2, 30, 40), (5, 6, 7, 8)))
    assert found[tmp_path / "a.png"].line == 2
    assert found[tmp_path / "vol.nii.gz"].prompts().boxes3d == [(1, 2, 0, 3, 4, 5)]
    assert found[tmp_path / "sub" / "b.nii.gz"].prompts().slice_index == 3


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "needs a header row"),
        ("path,x0,y0,x1\na.png,1,2,3\n", "line 1: no column 'y1'"),
        ("path,x0,y0,x1,y1,label\na.png,1,2,3,4,1\n", "line 1: unknown column 'label'"),
        ("path,x0,y0,x1,y1,z0\na.png,1,2,3,4,1\n", "line 1: a 3D box needs both columns"),
        ("path,x0,x0,y0,x1,y1\n", "line 1: column 'x0' twice"),
        ("path,x0,y0,x1,y1\na.png,1,2,3\n", "line 2: 4 cells for 5 columns"),
        ("path,x0,y0,x1,y1\n\na.png,1,2,three,4\n", "line 3: x1 'three' is not a number"),
        ("path,x0,y0,x1,y1\na.png,1,2,nan,4\n", "line 2: x1 'nan' is not a finite number"),
        ("path,x0,y0,x1,y1\n,1,2,3,4\n", "line 2: no path"),
        ("path,x0,y0,x1,y1,z0,z1\na.png,1,2,3,4,0,\n", "line 2: a 3D box needs both z0 and z1"),
        ("path,x0,y0,x1,y1,z0,z1,slice\na.png,1,2,3,4,0,1,2\n", "line 2: a 3D box takes no slice"),
        ("path,x0,y0,x1,y1,z0,z1\na.png,1,2,3,4,,\na.png,1,2,3,4,0,1\n", "line 3: a 3D box, but 2D boxes"),
        ("path,x0,y0,x1,y1,z0,z1\na.png,1,2,3,4,0,1\na.png,1,2,3,4,,\n", "line 3: a 2D box, but 3D boxes"),
        ("path,x0,y0,x1,y1,slice\na.png,1,2,3,4,1\na.png,1,2,3,4,2\n", "line 3: slice 2 for a.png (line 2)"),
        ("path,x0,y0,x1,y1,slice\na.png,1,2,3,4,1.5\n", "line 2: slice '1.5' is not a whole number"),
        ('path,x0,y0,x1,y1\n"a.png,1,2,3,4\n', "not CSV"),
        ("path,x0,y0,x1,y1\n", "no boxes"),
    ],
)
def test_a_malformed_table_is_one_line_naming_the_file_and_the_line(tmp_path: Path, text: str, fragment: str) -> None:
    table = write(tmp_path / "boxes.csv", text)
    with pytest.raises(MedsegError, match=r"boxes\.csv") as caught:
        read_boxes(table)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_a_missing_file_becomes_a_case_and_a_file_outside_the_inputs_is_refused(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "outside.png"):
        (tmp_path / name).write_bytes(b"")
    cases = {"a": [tmp_path / "a.png"], "b": [tmp_path / "b.png"]}
    table = write(tmp_path / "boxes.csv", "path,x0,y0,x1,y1\na.png,1,2,3,4\ngone_0000.png,1,2,3,4\n")
    every, boxes = boxes_of_cases(cases, table)
    assert every == {**cases, "gone": [tmp_path / "gone_0000.png"]}
    assert set(boxes) == {"a", "gone"}  # b has no row: segmenting it fails, a row of the manifest
    write(table, "path,x0,y0,x1,y1\na.png,1,2,3,4\noutside.png,1,2,3,4\n")
    with pytest.raises(MedsegError, match=r"boxes\.csv: line 3: .*outside\.png is not among the inputs"):
        boxes_of_cases(cases, table)
    write(table, "path,x0,y0,x1,y1\nelsewhere/a.png,1,2,3,4\n")
    with pytest.raises(MedsegError, match="are both case a"):
        boxes_of_cases(cases, table)
    with pytest.raises(MedsegError, match="a second channel"):
        boxes_of_cases({"a": [tmp_path / "a.png", tmp_path / "b.png"]}, table)
