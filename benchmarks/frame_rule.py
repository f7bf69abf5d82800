"""The in-context probe's frame-side check: how often its choice is a near tie, and what each rule then scores.

For every dataset and support size of `benchmarks/incontext.py`'s sorted protocol (supports the first ``n``
cases in name order, queries the last 40), the 2D probe can frame at 128 or at the supports' larger side
(`plane_frame_size`, up to 256). It segments each held-out support (`held_out_cases`: the last 3 from the
others, or a single support resampled) at both sides; this script records those Dice per held-out case and
label, and the queries' mean Dice (the raw probe, largest component kept) at each side. Two rules then pick a
side from the held-out Dice alone: ``higher mean`` (medseg before commit 8879ebc) and ``one SE`` (the larger
side only where its paired gain exceeds one standard error, `clearly_better`, medseg's rule since). The queries'
Dice of the side each rule picks is printed beside both sides' Dice. Cached per (dataset, size) in ``--work``;
run from the repository root::

    python benchmarks/frame_rule.py --work /tmp/frame_rule
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
from _rule_checks import cached_records, parse_arguments
from incontext import _mean_dice, _predictor


def main() -> None:
    args = parse_arguments(__doc__ or "", "/tmp/frame_rule", [1, 4, 16])
    _print(cached_records(args, "frame_rule.json", _record), args)


def _record(support: list, queries: list, values: list[int], _names: dict[int, str], protocol: Any) -> dict:
    """{'large': side, 'held': {side: [[case, label, Dice], ...]}, 'query': {side: mean Dice}}."""
    from medseg.inference.feature_incontext import PLANE_FRAME_SIDES, plane_frame_size

    predictor = _predictor("probe", protocol)
    images, maps = [s[0].array for s in support], [s[1] for s in support]
    large = plane_frame_size(images)
    record: dict = {"large": large, "held": {}, "query": {}}
    for side in sorted({PLANE_FRAME_SIDES[0], large}):
        held = predictor._held_out_scores(images, maps, values, side)
        record["held"][str(side)] = [[case, value, score] for (case, value), score in held.items()]
        with predictor._framed_at(side):
            labels = [predictor.predict(q.array, images, maps, largest_component=True).labels for q, _ in queries]
        truths = [truth for _, truth in queries]
        record["query"][str(side)] = float(np.mean([_mean_dice(labels, truths, v) for v in values]))
    return record


def _print(records: dict[str, dict], args: argparse.Namespace) -> None:
    from medseg.inference.feature_incontext import PLANE_FRAME_SIDES, clearly_better, mean_and_error

    print("Frame side of the 2D probe: held-out check and the queries' Dice (raw probe, sorted protocol)")
    print("| dataset | supports | larger side | held-out gain | its SE | Dice at 128 | Dice at larger | "
          "higher mean picks | one SE picks | Dice, higher mean | Dice, one SE |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    picked: dict[str, list[float]] = {"higher mean": [], "one SE": []}
    for name in args.datasets:
        for n in args.support_sizes:
            record = records.get(f"{name}/{n}")
            if record is None:
                continue
            small, large = str(PLANE_FRAME_SIDES[0]), str(record["large"])
            scores = {side: {(c, v): d for c, v, d in record["held"][side]} for side in {small, large}}
            keys = sorted(scores[small].keys() & scores[large].keys())
            gain, error = mean_and_error([scores[large][k] - scores[small][k] for k in keys])
            higher = large if gain > 0 else small  # the previous rule: a higher mean (ties: 128)
            one_se = large if clearly_better(scores[large], scores[small]) else small
            query = record["query"]
            picked["higher mean"].append(query[higher])
            picked["one SE"].append(query[one_se])
            sides = f"{query[small]:.3f} | {query[large]:.3f} | {higher} | {one_se}"
            print(f"| {name} | {n} | {large} | {gain:+.3f} | {error:.3f} | {sides} | "
                  f"{query[higher]:.3f} | {query[one_se]:.3f} |")  # fmt: skip
    count = len(picked["one SE"])
    print(f"\nMean over the {count} rows: higher mean {np.mean(picked['higher mean']):.3f}, "
          f"one SE {np.mean(picked['one SE']):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
