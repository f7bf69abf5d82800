"""8-bit grey images before LiteMedSAM: 0.5-99.5 percentile clipping against the model's own min-max scaling.

Protocol: for each dataset of ``--data`` whose images are 8-bit grey (RGB sets are skipped and said so), the
first ``--images`` images (sorted names); for each of their first three labels, a tight box around the ground
truth (pixel edges) is given to ``medseg.PromptEngine`` (LiteMedSAM) once with ``preset="percentile"`` and once
with ``preset="none"`` (min-max, as LiteMedSAM's training images: MedSAM's ``pre_grey_rgb.py``). Prints one table:
dataset, objects, mean Dice of each. Run from the repository root::

    python benchmarks/grey_presets.py --images 12
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import medseg
from medseg.io import load
from medseg.io.formats import split_extension


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--datasets", nargs="*", help="dataset folder names (default: all)")
    parser.add_argument("--images", type=int, default=12)
    args = parser.parse_args()
    engine = medseg.PromptEngine.from_pretrained()
    names = args.datasets or sorted(p.name for p in args.data.iterdir() if (p / "imagesTr").is_dir())
    print("| dataset | objects | Dice, percentile clipping | Dice, min-max (default) |\n|---|---|---|---|")
    for name in names:
        files = sorted(p for p in (args.data / name / "imagesTr").iterdir() if not p.name.startswith("."))
        scores: dict[str, list[float]] = {"percentile": [], "none": []}
        for file in files[: args.images]:
            image = load(file)
            if image.channels != 1 or image.array.dtype != np.uint8:
                break
            case = split_extension(file)[0].removesuffix("_0000")
            truth = load(next((args.data / name / "labelsTr").glob(f"{case}.*"))).array
            for value in [v for v in np.unique(truth) if v > 0][:3]:
                mask = truth == value
                rows, cols = np.nonzero(mask)
                box = (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))
                for preset, found in scores.items():
                    labels = engine.predict(image, prompts=medseg.Prompts(boxes=[box]), preset=preset).labels.array
                    found.append(_dice(labels > 0, mask))
        if not scores["none"]:
            print(f"| {name} | not 8-bit grey | | |")
            continue
        n = len(scores["none"])
        print(f"| {name} | {n} | {np.mean(scores['percentile']):.3f} | {np.mean(scores['none']):.3f} |")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))


if __name__ == "__main__":
    main()
