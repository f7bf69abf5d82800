"""What `frame_rule.py` and `decoder_rule.py` share: `benchmarks/incontext.py`'s sorted protocol, and records
computed per (dataset, support size) and cached in one JSON file, so that a stopped run resumes."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from incontext import _split, dataset_labels

DATASETS = ("BUSI", "DRIVE", "Hippocampus", "ISBI-EM", "JSRT", "Kvasir-SEG", "MoNuSeg", "WBC")
# a record of one support set: (supports, queries, label values, label names by value, protocol) -> JSON-able
Record = Callable[[list[Any], list[Any], list[int], dict[int, str], argparse.Namespace], dict[str, Any]]


def parse_arguments(description: str, work: str, sizes: list[int]) -> argparse.Namespace:
    """``--work``, ``--datasets`` (default: all eight) and ``--support-sizes`` (default ``sizes``)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(work))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--support-sizes", type=int, nargs="+", default=sizes)
    return parser.parse_args()


def cached_records(args: argparse.Namespace, name: str, record: Record) -> dict[str, dict[str, Any]]:
    """``{"dataset/size": record(...)}`` for every dataset and support size of ``args`` (sorted protocol: the
    first ``size`` cases support, the last 40 are the queries), read from ``args.work / name`` where computed
    before; each new one is written there as soon as it is done. Sizes larger than a dataset's pool are skipped."""
    import torch

    torch.set_num_threads(2)
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.work / name
    records: dict[str, dict[str, Any]] = json.loads(cache.read_text()) if cache.is_file() else {}
    protocol = argparse.Namespace(protocol="sorted", queries=40, seed=0, support_sizes=args.support_sizes,
                                  frame_size=None, support_scales=None, prototype_share=None, head=None)  # fmt: skip
    for dataset in args.datasets:
        if all(f"{dataset}/{n}" in records for n in args.support_sizes):
            continue
        pool, queries, values = _split(dataset, protocol)
        names = {int(v): k for k, v in dataset_labels(dataset).items()}
        for n in args.support_sizes:
            if f"{dataset}/{n}" not in records and n <= len(pool):
                started = time.perf_counter()
                records[f"{dataset}/{n}"] = record(pool[:n], queries, values, names, protocol)
                cache.write_text(json.dumps(records))
                print(f"{dataset} n={n}: {time.perf_counter() - started:.0f} s", flush=True)
    return records
