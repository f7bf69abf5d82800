"""Leave-one-dataset-out choice between in-context variants, from `benchmarks/incontext.py`'s cached results.

A default (support scales on or off, the decoder or not) is a rule tuned on data; reported on a dataset it must
not have seen it. For every dataset this script picks the variant with the best mean Dice over the *other*
datasets (every label and every support size given, equally weighted per dataset), then reports that variant's
Dice on the left-out dataset. A default that every left-out choice agrees on was chosen without the dataset
it is scored on, whichever dataset that is.

Variants are the stems of the cache files without the dataset name and protocol suffix (``probe_lcc``...);
``A[1:B]`` is variant A with B's results for one support (a rule for single supports, compared as a whole).
Run the benchmark for each first::

    python benchmarks/incontext.py --support-sizes 1 4 16 --engines probe probe+decoder --work W
    python benchmarks/incontext.py --support-sizes 1 4 16 --engines probe probe+decoder --support-scales on --work W
    python benchmarks/incontext_lodo.py --work W --variants probe_lcc probe_lcc_scaleson \
        probe+decoder_lcc probe+decoder_lcc_scaleson
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

DATASETS = ("BUSI", "DRIVE", "Hippocampus", "ISBI-EM", "JSRT", "Kvasir-SEG", "MoNuSeg", "WBC")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/medseg_incontext_bench"))
    parser.add_argument("--variants", nargs="+", required=True, help="engine + suffix, e.g. probe_lcc")
    parser.add_argument("--suffix", default="_q40_s0_sorted", help="the cache files' protocol suffix")
    parser.add_argument("--sizes", nargs="+", default=["1", "4", "16"])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    args = parser.parse_args()
    scores = {v: {d: _dataset_mean(args.work, d, v, args.suffix, args.sizes) for d in args.datasets}
              for v in args.variants}  # fmt: skip
    print("Mean Dice per dataset (labels and support sizes " + ", ".join(args.sizes) + " equally weighted)")
    print("| variant | " + " | ".join(args.datasets) + " | mean |")
    print("|---|" + "---|" * (len(args.datasets) + 1))
    for variant, by_dataset in scores.items():
        cells = [_cell(by_dataset[d]) for d in args.datasets]
        print(f"| {variant} | " + " | ".join(cells) + f" | {_cell(_mean(list(by_dataset.values())))} |")
    print("\nLeft out | chosen on the others | its Dice there")
    print("|---|---|---|")
    chosen_scores = []
    for left_out in args.datasets:
        others = [d for d in args.datasets if d != left_out]
        means = {v: _mean([scores[v][d] for d in others]) for v in args.variants}
        usable = {v: m for v, m in means.items() if m is not None}
        if not usable or scores[max(usable, key=lambda v: usable[v])][left_out] is None:
            print(f"| {left_out} | - | - |")
            continue
        best = max(usable, key=lambda v: usable[v])
        chosen_scores.append(scores[best][left_out])
        print(f"| {left_out} | {best} | {_cell(scores[best][left_out])} |")
    if chosen_scores:
        print(f"\nMean over left-out datasets of the variant chosen without them: {np.mean(chosen_scores):.3f}")


def _dataset_mean(work: Path, dataset: str, variant: str, suffix: str, sizes: list[str]) -> float | None:
    """Mean Dice over the labels and sizes of one variant on one dataset; None when a cache file is missing or
    lacks a size."""
    base, _, single = variant.partition("[1:")
    path = work / f"{dataset}_{base}{suffix}.json"
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    if single:
        other = work / f"{dataset}_{single.rstrip(']')}{suffix}.json"
        if not other.is_file():
            return None
        done["1"] = json.loads(other.read_text()).get("1")
    values = [v for n in sizes for v in (done.get(n) or {}).values() if v is not None]
    if any(n not in done for n in sizes) or not values:
        return None
    return float(np.mean(values))


def _mean(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else float(np.mean([v for v in values if v is not None]))


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
