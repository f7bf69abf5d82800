"""GenSeg against standard augmentation at few labels (issue 19), every row under the same wall-clock budget.

For each dataset (``../shared/data``), seed and encoder (``--backbones``: plain, litemedsam), three runs of
``medseg.engine.supervised.train`` on the same ``--num-labelled`` cases (drawn with the seed; JSRT 9,
Hippocampus 10, the others 40 by default):

- ``standard``: the U-Net the plan chooses with nnU-Net-style augmentation, on all N cases;
- ``separate``: GenSeg's two-stage ablation (generator trained first, then frozen; its pairs added);
- ``genseg``: GenSeg end to end (the generator's architecture steered by the validation loss).

``--all-labels`` trains on every labelled case of fold 0's training split instead (the issue's 20-minute
Kvasir-SEG row: ``--datasets Kvasir-SEG --backbones litemedsam --methods standard --all-labels --minutes 20``).

GenSeg's rows train on N minus a fifth (kept for its validation loss), as the method prescribes. Each run
gets ``--minutes`` of training (epochs of ``--iterations`` steps, so the budget is kept to within one
short epoch), then predicts the dataset's *other* labelled cases from their files (``--eval-cases`` of
them, drawn with a fixed seed, the same for every row of a dataset) and scores the mean Dice over the
foreground labels. Results are kept per run in ``--work`` (``--resume`` skips finished runs). Run from the
repository root, alone on the machine (the budget is wall clock)::

    python benchmarks/genseg.py --datasets JSRT --minutes 1 --eval-cases 10       # smoke run
    python benchmarks/genseg.py --minutes 4 --resume
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
LABELLED = {"JSRT": 9, "Hippocampus": 10}
METHODS = {"standard": None, "separate": "separate", "genseg": "end-to-end"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="JSRT,Kvasir-SEG,BUSI,WBC")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--backbones", default="plain")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--minutes", type=float, default=4.0, help="training budget per run (wall clock)")
    parser.add_argument("--iterations", type=int, default=10, help="steps per epoch")
    parser.add_argument("--num-labelled", type=int, default=40, help="labelled cases (JSRT 9, Hippocampus 10)")
    parser.add_argument("--all-labels", action="store_true", help="train on every labelled case of fold 0's split")
    parser.add_argument("--eval-cases", type=int, default=60, help="other cases scored per dataset")
    parser.add_argument("--work", type=Path, default=Path("/tmp/medseg-genseg-bench"))
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for dataset in args.datasets.split(","):
        for backbone in args.backbones.split(","):
            for method in args.methods.split(","):
                for seed in [int(s) for s in args.seeds.split(",")]:
                    rows.append(_run(args, dataset, backbone, method, seed))
    _print_table(rows, args)


def _run(args: argparse.Namespace, dataset: str, backbone: str, method: str, seed: int) -> dict[str, Any]:
    import torch

    from medseg.data import open_dataset
    from medseg.engine.supervised import TrainOptions, train
    from medseg.planning import fingerprint_dataset, make_plan

    name = f"{dataset}-{backbone}-{method}-s{seed}" + ("-all" if args.all_labels else "")
    result_file = args.work / f"{name}.json"
    if args.resume and result_file.is_file():
        return dict(json.loads(result_file.read_text()))
    out = args.work / name
    if out.exists():
        import shutil

        shutil.rmtree(out)
    data = open_dataset(DATA / dataset)
    plan = make_plan(fingerprint_dataset(data), "unet")
    plan.training.iterations_per_epoch = args.iterations
    plan.training.val_cases_per_epoch = 4
    labelled = None if args.all_labels else min(LABELLED.get(dataset, args.num_labelled), args.num_labelled)
    torch.manual_seed(seed)
    started = time.perf_counter()
    result = train(
        TrainOptions(
            DATA / dataset,
            out,
            plan=plan,
            num_labelled=labelled,
            minutes=args.minutes,
            seed=seed,
            backbone=backbone,
            genseg=METHODS[method],
            epochs=100_000,
        )
    )
    wall = time.perf_counter() - started
    split = json.loads((out / "split.json").read_text())
    used = set(split["train"]) | set(split.get("genseg_val", []))
    dice, cases = _score(out, data, used, args.eval_cases)
    record = {
        "dataset": dataset,
        "backbone": backbone,
        "method": method,
        "seed": seed,
        "labelled": len(split["train"]) + len(split.get("genseg_val", [])),
        "train_cases": len(split["train"]),
        "epochs": result.epochs,
        "training_s": round(result.training_seconds, 1),
        "wall_s": round(wall, 1),
        "dice": round(dice, 4),
        "eval_cases": cases,
        "kernel_weights": json.loads((out / "train.json").read_text()).get("genseg"),
    }
    result_file.write_text(json.dumps(record, indent=1))
    print(json.dumps(record), flush=True)
    return record


def _score(model_dir: Path, data: Any, used: set[str], count: int) -> tuple[float, int]:
    """Mean over cases of the mean Dice over foreground labels (both empty: 1), on ``count`` other cases."""
    from medseg.data.cases import load_case
    from medseg.inference.supervised_predictor import SupervisedPredictor
    from medseg.metrics.surface import dice

    others = sorted(c.name for c in data.cases if c.label is not None and c.name not in used)
    chosen = set(np.random.default_rng(1234).choice(others, min(count, len(others)), replace=False).tolist())
    predictor = SupervisedPredictor(model_dir, "cpu")
    values = [v for v in predictor.plan.label_values() if v]
    scores = []
    for case in data.cases:
        if case.name not in chosen:
            continue
        image, label = load_case(case)
        predicted = predictor.predict(image).labels
        scores.append(float(np.mean([dice(predicted == v, label == v) for v in values])))
    return float(np.mean(scores)), len(scores)


def _print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    title = f"GenSeg vs standard augmentation: {args.minutes:g} min per run, Dice on other cases"
    table = Table(title=title + (" (all labels)" if args.all_labels else ""))
    for column in ("dataset", "encoder", "labelled", "method", "seeds", "Dice", "vs standard", "epochs", "train s"):
        table.add_column(column)
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["backbone"], row["method"]), []).append(row)
    for (dataset, backbone, method), group in groups.items():
        mean = float(np.mean([r["dice"] for r in group]))
        base = groups.get((dataset, backbone, "standard"))
        delta = "" if base is None or method == "standard" else f"{mean - np.mean([r['dice'] for r in base]):+.3f}"
        table.add_row(
            dataset,
            backbone,
            str(group[0]["labelled"]),
            method,
            str(len(group)),
            f"{mean:.3f}",
            delta,
            str(round(float(np.mean([r["epochs"] for r in group])))),
            f"{np.mean([r['training_s'] for r in group]):.0f}",
        )
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
