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
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from incontext import _DECODER, _mean_dice, _refined_engine, _split, dataset_labels

DATASETS = ("BUSI", "DRIVE", "Hippocampus", "ISBI-EM", "JSRT", "Kvasir-SEG", "MoNuSeg", "WBC")


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/decoder_rule"))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--support-sizes", type=int, nargs="+", default=[4, 16])
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.work / "decoder_rule.json"
    records: dict[str, dict] = json.loads(cache.read_text()) if cache.is_file() else {}
    split_args = argparse.Namespace(protocol="sorted", queries=40, seed=0, support_sizes=args.support_sizes,
                                    frame_size=None, support_scales=None, prototype_share=None, head=None)  # fmt: skip
    for name in args.datasets:
        if all(f"{name}/{n}" in records for n in args.support_sizes):
            continue
        pool, queries, values = _split(name, split_args)
        names = {int(v): k for k, v in dataset_labels(name).items()}
        for n in args.support_sizes:
            if f"{name}/{n}" not in records and n <= len(pool):
                started = time.perf_counter()
                records[f"{name}/{n}"] = _record(pool[:n], queries, values, names, split_args)
                cache.write_text(json.dumps(records))
                print(f"{name} n={n}: {time.perf_counter() - started:.0f} s", flush=True)
    _print(records, args)


def _record(support: list, queries: list, values: list[int], names: dict[int, str], split_args: Any) -> dict:
    """{label name: {'gains': [held-out Dice gains], 'raw': query Dice, 'refined': query Dice}}."""
    from medseg.inference.draft_refinement import decoder_key, refine_with_decoder
    from medseg.io.image import as_label_array

    images, labels = [s[0] for s in support], [s[1] for s in support]
    engine = _refined_engine("probe+decoder", images, labels, split_args)
    options = {"largest_component": True}
    arrays = [as_label_array(label) if hasattr(label, "array") else np.asarray(label) for label in labels]
    gains: dict[int, list[float]] = {v: [] for v in values}
    engine.incontext.predict(images[-1], **options)  # the whole set prepared (its frame side chosen) first
    with engine.incontext.frame_pinned():
        engine._held_out_gains(images, labels, arrays, values, gains, options)
    raw = [engine.incontext.predict(query, **options).labels.array for query, _ in queries]
    truths = [truth for _, truth in queries]
    record = {}
    for v in values:
        redrawn = [
            refine_with_decoder(_DECODER[0], query, draft, decoder_key(query), {v})
            for (query, _), draft in zip(queries, raw, strict=True)
        ]
        record[names.get(v, str(v))] = {"gains": gains[v], "raw": _mean_dice(raw, truths, v),
                                        "refined": _mean_dice(redrawn, truths, v)}  # fmt: skip
    return record


def _print(records: dict[str, dict], args: argparse.Namespace) -> None:
    from medseg.inference.feature_incontext import clearly_better

    print("The decoder's choice per label: held-out gains and the queries' Dice (sorted protocol)")
    print("| dataset | supports | label | held-out gain | its SE | cases | Dice raw | Dice redrawn | "
          "mean > 0 | one SE |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    picked: dict[str, list[float]] = {"mean > 0": [], "one SE": []}
    for name in args.datasets:
        for n in args.support_sizes:
            for label, row in records.get(f"{name}/{n}", {}).items():
                gains = np.array(row["gains"], dtype=float)
                error = gains.std(ddof=1) / np.sqrt(len(gains)) if len(gains) > 1 else 0.0
                simple = bool(len(gains) and gains.mean() > 0)
                strict = clearly_better(
                    {(i, 0): g for i, g in enumerate(gains)}, {(i, 0): 0.0 for i in range(len(gains))}
                )
                picked["mean > 0"].append(row["refined"] if simple else row["raw"])
                picked["one SE"].append(row["refined"] if strict else row["raw"])
                mean = f"{gains.mean():+.3f}" if len(gains) else "-"
                choices = f"{'redraw' if simple else 'raw'} | {'redraw' if strict else 'raw'}"
                print(f"| {name} | {n} | {label} | {mean} | {error:.3f} | {len(gains)} | {row['raw']:.3f} | "
                      f"{row['refined']:.3f} | {choices} |")  # fmt: skip
    count = len(picked["one SE"])
    print(f"\nMean over the {count} label rows: mean > 0 {np.mean(picked['mean > 0']):.3f}, "
          f"one SE {np.mean(picked['one SE']):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
