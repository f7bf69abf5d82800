"""Write an `Evaluation`: per-case CSV, JSON summary and a PNG figure, all or nothing."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from medseg.evaluation.evaluate import Evaluation

CSV_NAME, SUMMARY_NAME, FIGURE_NAME = "metrics.csv", "summary.json", "evaluation.png"


def write_report(
    evaluation: Evaluation, out_dir: Path, image_for_case: Callable[[str], Path | None] | None = None
) -> list[Path]:
    """Write ``metrics.csv``, ``summary.json`` and ``evaluation.png`` into ``out_dir``.

    Files are first written into a temporary folder beside ``out_dir`` and moved in only when all
    three exist, so a failure leaves no partial output. Returns the written paths.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write_csv(evaluation, staging / CSV_NAME)
        (staging / SUMMARY_NAME).write_text(json.dumps(_json_safe(evaluation.summary()), indent=2) + "\n")
        from medseg.evaluation.figure import draw_figure

        draw_figure(evaluation, staging / FIGURE_NAME, image_for_case)
        if not out_dir.exists():
            staging.rename(out_dir)
        else:
            for name in (CSV_NAME, SUMMARY_NAME, FIGURE_NAME):
                os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [out_dir / n for n in (CSV_NAME, SUMMARY_NAME, FIGURE_NAME)]


def write_csv(evaluation: Evaluation, path: Path) -> None:
    """Columns ``case, label, label_name, dice, nsd, hd95_mm``, one row per case and label."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "label", "label_name", "dice", "nsd", "hd95_mm"])
        for r in evaluation.rows:
            writer.writerow([r.case, r.label, r.label_name, f"{r.dice:.6f}", f"{r.nsd:.6f}", f"{r.hd95_mm:.4f}"])


def _json_safe(value: object) -> object:
    """NaN (e.g. std of no values) becomes null so that the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value
