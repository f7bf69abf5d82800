"""How many relative-position bins for in-context 3D (``slice_bins``): chosen on Hippocampus volumes that the
benchmark (``benchmarks/incontext.py --hippocampus``, seed 0) does not use.

Cases: the labelled Hippocampus cases in the order of a ``--seed`` permutation (default 1), leaving out the first
13 of the seed-0 permutation (the benchmark's 3 supports and up to 10 queries); the first 3 are the support
volumes, the next ``--queries`` the query volumes. Each variant (a number of bins, or ``none``: each slice on its
own) runs with a fresh probe engine; prints mean Dice per label and the seconds of the first volume (it pays for
the supports) and of the later ones, one JSON line per variant.

    python benchmarks/incontext_slice_bins.py --queries 8 --bins 2 4 6 8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from medseg.data import open_dataset
from medseg.data.cases import load_case
from medseg.inference.feature_incontext import FeatureMatchingPredictor
from medseg.metrics.surface import dice

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--bins", nargs="+", default=["2", "4", "6", "8"], help="numbers of bins, or none")
    args = parser.parse_args()
    torch.set_num_threads(2)
    dataset = open_dataset(DATA / "Hippocampus")
    cases = [c for c in dataset.cases if c.label is not None]
    reported = {int(i) for i in np.random.default_rng(0).permutation(len(cases))[:13]}
    order = [int(i) for i in np.random.default_rng(args.seed).permutation(len(cases)) if int(i) not in reported]
    loaded = [load_case(cases[i]) for i in order[: 3 + args.queries]]
    support, queries = loaded[:3], loaded[3:]
    for variant in args.bins:
        bins = None if variant == "none" else int(variant)
        predictor = FeatureMatchingPredictor.from_checkpoint()
        predictor.cache_size = 2048
        scores: dict[int, list[float]] = {1: [], 2: []}
        seconds = []
        for image, truth in queries:
            assert truth is not None
            started = time.perf_counter()
            result = predictor.predict(
                image.array, [s[0].array for s in support], [s[1] for s in support],
                query_is_volume=True, support_are_volumes=True, slice_bins=bins,
            )  # fmt: skip
            seconds.append(time.perf_counter() - started)
            for value in scores:
                scores[value].append(dice(result.labels == value, truth == value))
        row = {
            "bins": bins,
            "anterior": round(float(np.mean(scores[1])), 4),
            "posterior": round(float(np.mean(scores[2])), 4),
            "first_s": round(seconds[0], 1),
            "later_s": round(float(np.mean(seconds[1:])), 1) if len(seconds) > 1 else None,
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
