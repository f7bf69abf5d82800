"""The in-context probe's one-off fit: K labels fitted one by one against together (`fit_support_probes`).

Random unit rows stand in for the support set's feature locations (608 channels, the probe's three TinyViT
stages; float16 above 4096 rows, as the stored frames are) with random targets: the fit's cost does not depend
on their values. Rows: 4096 (one support framed at 128), 65536 (16), 262144 (64). Both ways are timed
alternately, ``--repeats`` times, 2 threads; run it alone on the machine::

    python benchmarks/probe_fit.py --labels 3 --repeats 3
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from medseg.models.incontext.support_probe import fit_support_probe, fit_support_probes

CHANNELS = 608


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, nargs="+", default=[4096, 65536, 262144])
    args = parser.parse_args()
    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(0)
    print("| rows | labels | one by one, median s | together, median s | ratio | runs |")
    print("|---|---|---|---|---|---|")
    for rows in args.rows:
        features = torch.randn(rows, CHANNELS, generator=generator)
        features = features.to(torch.float16) if rows > 4096 else features
        targets = (torch.rand(rows, args.labels, generator=generator) > 0.7).float()
        apart, together = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            for label in range(args.labels):
                fit_support_probe(features, targets[:, label].contiguous(), seed=0)
            apart.append(time.perf_counter() - started)
            started = time.perf_counter()
            fit_support_probes(features, targets, seed=0)
            together.append(time.perf_counter() - started)
        one, joint = float(np.median(apart)), float(np.median(together))
        print(f"| {rows} | {args.labels} | {one:.2f} | {joint:.2f} | {joint / one:.2f} | {args.repeats} |", flush=True)


if __name__ == "__main__":
    main()
