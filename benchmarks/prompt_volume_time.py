"""Wall time of one 3D box over 30 slices of 256 x 256 (issue 17's speed target: <= 20 s on 2 idle cores).

The volume is real: 30 axial slices of the LiTS CT case that ``liver-ct-segmentation-package`` ships,
each 128 x 128 slice doubled to 256 x 256 (pixel repetition), with the liver's 3D box on those slices.
Runs `prompt_session.segment` as ``medseg prompt --box3d`` does (a fresh predictor cache, the
embedding of every slice, propagation), ``--repeats`` times after one warm-up; prints a table with the
load average before and after (a busy machine's numbers are not the target's).

    python benchmarks/prompt_volume_time.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from medseg.inference.prompt_predictor import PromptPredictor
from medseg.inference.prompt_session import Prompts, segment
from medseg.io import Geometry, Image, load

SLICES = 30


def volume_and_box() -> tuple[Image, tuple[float, float, float, float, float, float]]:
    folder = Path(str(resources.files("liver_ct_segmentation_package") / "data"))
    ct, labels = load(folder / "img_117.mrc").array, load(folder / "lab_117.mrc").array
    first = 50
    chunk = np.kron(ct[first : first + SLICES], np.ones((1, 2, 2), np.float32))
    liver = np.kron(labels[first : first + SLICES] == 1, np.ones((1, 2, 2), bool))
    rows, cols = np.flatnonzero(liver.any(axis=(0, 2))), np.flatnonzero(liver.any(axis=(0, 1)))
    box = (float(cols[0]), float(rows[0]), 0.0, float(cols[-1] + 1), float(rows[-1] + 1), float(SLICES - 1))
    image = Image(chunk, Geometry((0.5, 0.5, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel())))
    image.meta["modality"] = "CT"
    return image, box


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    image, box = volume_and_box()
    predictor = PromptPredictor.from_checkpoint()
    load_before = os.getloadavg()[0]
    segment(predictor, image, Prompts(boxes3d=[box]))  # warm-up
    seconds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        segment(predictor, image, Prompts(boxes3d=[box]))
        seconds.append(time.perf_counter() - started)
    table = Table(title=f"one 3D box over {SLICES} slices of 256 x 256 (LiTS CT, liver)")
    for column in ("threads", "runs", "median s", "min s", "s per slice", "target", "load avg before/after"):
        table.add_column(column)
    median = statistics.median(seconds)
    table.add_row(
        str(args.threads),
        str(len(seconds)),
        f"{median:.1f}",
        f"{min(seconds):.1f}",
        f"{median / SLICES:.2f}",
        "<= 20 s: " + ("met" if median <= 20 else "NOT met"),
        f"{load_before:.1f} / {os.getloadavg()[0]:.1f}",
    )
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
