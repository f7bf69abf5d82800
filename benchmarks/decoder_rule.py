"""The in-context decoder's choice (``--decoder auto``): how near its held-out decisions are to a tie, and what two
rules then score.

For every dataset, support size (4 and 16: a single support is never refined) and label of
`benchmarks/incontext.py`'s sorted protocol, `DecoderRefinedEngine` segments each of the last 3 supports from the
others and records, per label, the Dice gained by redrawing it with the LiteMedSAM decoder; the 40 queries are
then predicted raw and with that label redrawn (each label alone, so labels redrawn together by the engine may
differ slightly). Two rules decide from the held-out gains alone: ``mean > 0`` (medseg's rule) and ``one SE`` (the
mean gain above one standard error, as the frame side's `clearly_better`). Cached per (dataset, size) in
``--work``; run from the repository root::

    python benchmarks/decoder_rule.py --work /tmp/decoder_rule
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
from _rule_checks import cached_records, parse_arguments
from incontext import _DECODER, _mean_dice, _refined_engine


def main() -> None:
    args = parse_arguments(__doc__ or "", "/tmp/decoder_rule", [4, 16])
    _print(cached_records(args, "decoder_rule.json", _record), args)


def _record(support: list, queries: list, values: list[int], names: dict[int, str], protocol: Any) -> dict:
    """{label name: {'gains': [held-out Dice gains], 'raw': query Dice, 'refined': query Dice}}."""
    from medseg.inference.draft_refinement import decoder_key, refine_with_decoder

    engine = _refined_engine("probe+decoder", [s[0] for s in support], [s[1] for s in support], protocol)
    options = {"largest_component": True}
    gains = engine.held_out_gains(options)
    raw = [engine.incontext.predict(query, **options).labels.array for query, _ in queries]
    truths = [truth for _, truth in queries]
    record = {}
    for v in values:
        redrawn = [
            refine_with_decoder(_DECODER[0], query, draft, decoder_key(query), {v})
            for (query, _), draft in zip(queries, raw, strict=True)
        ]
        record[names.get(v, str(v))] = {"gains": gains.get(v, []), "raw": _mean_dice(raw, truths, v),
                                        "refined": _mean_dice(redrawn, truths, v)}  # fmt: skip
    return record


def _print(records: dict[str, dict], args: argparse.Namespace) -> None:
    from medseg.inference.feature_incontext import FRAME_MARGIN, mean_and_error

    print("The decoder's choice per label: held-out gains and the queries' Dice (sorted protocol)")
    print("| dataset | supports | label | held-out gain | its SE | cases | Dice raw | Dice redrawn | "
          "mean > 0 | one SE |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    picked: dict[str, list[float]] = {"mean > 0": [], "one SE": []}
    for name in args.datasets:
        for n in args.support_sizes:
            for label, row in records.get(f"{name}/{n}", {}).items():
                gain, error = mean_and_error(row["gains"])
                simple = bool(row["gains"]) and gain > 0  # medseg's rule (`DecoderRefinedEngine`)
                strict = bool(row["gains"]) and gain > FRAME_MARGIN * error  # as `clearly_better`
                picked["mean > 0"].append(row["refined"] if simple else row["raw"])
                picked["one SE"].append(row["refined"] if strict else row["raw"])
                mean = f"{gain:+.3f}" if row["gains"] else "-"
                choices = f"{'redraw' if simple else 'raw'} | {'redraw' if strict else 'raw'}"
                print(f"| {name} | {n} | {label} | {mean} | {error:.3f} | {len(row['gains'])} | {row['raw']:.3f} | "
                      f"{row['refined']:.3f} | {choices} |")  # fmt: skip
    count = len(picked["one SE"])
    print(f"\nMean over the {count} label rows: mean > 0 {np.mean(picked['mean > 0']):.3f}, "
          f"one SE {np.mean(picked['one SE']):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
