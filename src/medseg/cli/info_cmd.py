"""``medseg info FILE``: shape, geometry, intensities, and labels with voxel counts and volumes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from medseg.cli.common import fail, out, user_errors

if TYPE_CHECKING:
    import numpy as np

    from medseg.io import Image


@user_errors
def info(
    path: Path = typer.Argument(
        ..., metavar="FILE", help="Image or label map (any format medseg reads; a DICOM folder)."
    ),
    as_label: bool | None = typer.Option(
        None, "--label/--image", help="Treat as label map / image (default: guessed from the values)."
    ),
    frame: int | None = typer.Option(None, "--frame", help="Of a 4D file (time series, cine): the volume to show."),
    series: str | None = typer.Option(
        None, "--series", help="Of a DICOM folder holding several series: its SeriesNumber or SeriesInstanceUID."
    ),
) -> None:
    """Print shape, spacing, orientation, intensity range and, for label maps, labels with volumes.

    A 4D file shows its frame count and one frame (the first, or --frame); NaN/inf voxels are counted."""
    from rich.table import Table

    from medseg.io import load
    from medseg.io.image import MAX_LABELS
    from medseg.io.sitk_io import FourDimensionalError
    from medseg.preprocessing.statistics import count_distinct, distinct, percentiles, summarize

    try:
        image = load(path, frame=frame, series=series)
    except FourDimensionalError:
        image = load(path, frame=0, series=series)
    g = image.geometry
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    unit = "mm" if image.meta.get("format") not in ("png", "jpeg", "bmp", "gif", "tiff", "npy") else "mm (assumed)"
    rows = [
        ("file", str(path)),
        ("format", str(image.meta.get("format"))),
        ("dimensions", f"{image.ndim}D, {image.channels} channel{'s' if image.channels > 1 else ''}"),
        ("shape", f"{_fmt(image.shape, '{}')} (numpy order {'z, y, x' if image.ndim == 3 else 'y, x'})"),
        ("size", f"{_fmt(tuple(reversed(image.shape)), '{}')} (x, y{', z' if image.ndim == 3 else ''})"),
        ("spacing", f"{_fmt(g.spacing)} {unit} (x, y{', z' if image.ndim == 3 else ''})"),
        ("origin", f"{_fmt(g.origin)} mm (LPS)"),
        ("orientation", f"{g.orientation()} (direction {_fmt(g.direction, '{:.4g}')})"),
        ("dtype", str(image.array.dtype)),
    ]
    if "frames" in image.meta:
        shown = f"frame {image.meta['frame']} shown" + ("" if frame is not None else "; --frame picks another")
        rows.append(("frames", f"{image.meta['frames']} (4D; {shown})"))
    keys = ("modality", "series_description", "dicom_files", "rescale", "gantry_tilt", "npz_key", "alpha")
    for key in (*keys, "nifti_transform"):
        if key in image.meta:
            rows.append((key.replace("_", " "), str(image.meta[key])))
    if "nifti_transform_conflict" in image.meta:
        rows.append(("warning", str(image.meta["nifti_transform_conflict"])))
    summary = summarize(image.array)  # in bounded memory: see medseg.preprocessing.statistics
    if summary.count:
        p_lo, p_hi = percentiles(summary.ordered, (0.5, 99.5))
        rows.append(
            (
                "intensity",
                f"min {summary.minimum:.6g}, max {summary.maximum:.6g}, mean {summary.mean:.6g}, "
                f"std {summary.std:.6g}, p0.5 {p_lo:.6g}, p99.5 {p_hi:.6g}",
            )
        )
    if summary.nan or summary.inf:
        n_bad = summary.nan + summary.inf
        rows.append(("NaN/inf", f"{n_bad} voxels ({summary.nan} NaN, {summary.inf} inf; left out of the intensities)"))
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)
    one_channel = image.array.dtype.kind in "biuf" and image.channels == 1
    integral = one_channel and summary.count > 0 and summary.integral and summary.minimum >= 0
    # a scanner's series (CT, PT, MR, ...) is an image whatever its values; a DICOM-SEG is a label map
    scan = image.meta.get("format") == "dicom" and str(image.meta.get("modality", "")).upper() not in ("", "SEG")
    looks_like_labels = (  # Image.is_label_map, from the sorted values
        one_channel and image.array.dtype.kind in "biu" and integral and count_distinct(summary.ordered) <= MAX_LABELS
    )
    is_label = as_label if as_label is not None else (looks_like_labels and not scan)
    if is_label:
        if not integral:
            fail(f"{path}: values are not non-negative integers, so this is not a label map")
        _print_labels(image, *distinct(summary.ordered), path)


def _print_labels(image: Image, uniques: np.ndarray, counted: np.ndarray, path: Path) -> None:
    from rich.table import Table

    from medseg.data import find_dataset_json, label_names_of, read_dataset_json

    names: dict[int, str] = dict(image.meta.get("segment_names", {}))  # a DICOM-SEG names its segments
    dataset_json = find_dataset_json(path.parent)
    if dataset_json is not None and not names:
        names = label_names_of(read_dataset_json(dataset_json))
    volume_unit = "ml" if image.ndim == 3 else "mm^2"
    table = Table(title="labels")
    for column in ("label", "name", "voxels", volume_unit):
        table.add_column(column, justify="right" if column != "name" else "left")
    counts = {int(v): int(c) for v, c in zip(uniques, counted, strict=True)}
    for value, count in counts.items():
        size = count * image.voxel_volume_mm3
        amount = f"{size / 1000:.3f}" if image.ndim == 3 else f"{size:.1f}"
        table.add_row(str(value), names.get(value, ""), str(count), amount)
    out.print(table)


def _fmt(values: tuple[float, ...], pattern: str = "{:.6g}") -> str:
    return "(" + ", ".join(pattern.format(v) for v in values) + ")"
