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

from medseg.errors import MedsegError
from medseg.evaluation.evaluate import Evaluation

CSV_NAME, SUMMARY_NAME, FIGURE_NAME = "metrics.csv", "summary.json", "evaluation.png"
OUTPUT_NAMES = (CSV_NAME, SUMMARY_NAME, FIGURE_NAME)


def write_report(
    evaluation: Evaluation, out_dir: Path, image_for_case: Callable[[str], Path | None] | None = None
) -> list[Path]:
    """Write ``metrics.csv``, ``summary.json`` and ``evaluation.png`` into ``out_dir``.

    Files are first written into a temporary folder beside ``out_dir`` and moved in only when all
    three exist, so a failure leaves no partial output (nor folders created for it).

    Raises:
        MedsegError: the output folder cannot be created or written.
    """
    for name in OUTPUT_NAMES:
        if (out_dir / name).is_dir():
            raise MedsegError(f"{name} exists there as a folder", out_dir)
    created = _missing_parents(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    except OSError as err:
        _remove_empty(created)
        raise MedsegError(f"cannot create the output folder ({err.strerror or err})", out_dir) from None
    done = False
    try:
        write_csv(evaluation, staging / CSV_NAME)
        (staging / SUMMARY_NAME).write_text(json.dumps(_json_safe(evaluation.summary()), indent=2) + "\n")
        from medseg.evaluation.figure import draw_figure

        draw_figure(evaluation, staging / FIGURE_NAME, image_for_case)
        if not out_dir.exists():
            staging.chmod(0o777 & ~_umask())  # mkdtemp makes 0700 folders
            staging.rename(out_dir)
        else:
            for name in OUTPUT_NAMES:
                os.replace(staging / name, out_dir / name)
        done = True
    except OSError as err:
        raise MedsegError(f"cannot write the evaluation ({err.strerror or err})", out_dir) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not done:
            _remove_empty(created)
    return [out_dir / n for n in OUTPUT_NAMES]


def _missing_parents(path: Path) -> list[Path]:
    """The ancestors of ``path`` that do not exist yet, deepest first."""
    missing = []
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            break
        missing.append(parent)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
