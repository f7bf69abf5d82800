"""Benchmark of medseg's supervised engine (plan -> train -> predict) on CPU, with nnU-Net v2 side by side.

For each dataset (default: JSRT, Kvasir-SEG, BUSI, WBC from ../shared/data in 2D, Hippocampus in 3D) and
model, on the same machine, one after the other:

1. ``medseg.engine.supervised.train`` with the plan medseg makes, fold 0 of medseg's 5-fold split, for a
   fixed wall-clock budget of ``--minutes`` (training + per-epoch validation; reading and preprocessing
   the data is not counted and is shown apart);
2. prediction of every validation case of that fold from its file (``SupervisedPredictor``, no
   mirroring), scored on the original grid with medseg.metrics: mean Dice and NSD (tolerance
   ``--nsd-mm``, 1 mm = 1 pixel for PNG) per label, over cases where the label is present in the
   ground truth or the prediction (both empty counts as 1);
3. patches per second over the whole training budget, seconds of inference per case, and the peak
   resident memory of the process that trained and predicted.

With ``--nnunet-python`` (a Python with ``nnunetv2`` installed, for example its own venv) the datasets in
``--nnunet-datasets`` also go through nnU-Net v2: ``nnUNetv2_plan_and_preprocess`` (2d or 3d_fullres), the
same train/validation split written as its ``splits_final.json``, ``nnUNetv2_train -device cpu`` with
``benchmarks/_nnunet_budget_trainer.py`` (nnU-Net's default trainer stopped at the same budget), and
``nnUNetv2_predict -device cpu --disable_tta`` on the same validation files, scored the same way. The
table gives the ratio of medseg's mean Dice to nnU-Net's.

Results are cached per run under ``--work`` (``--fresh`` removes them), so an interrupted benchmark
continues where it stopped. Run from the repository root::

    python benchmarks/supervised.py --minutes 0.5 --datasets WBC                  # smoke run
    python benchmarks/supervised.py --minutes 8 --nnunet-python /work/nnunetvenv/bin/python \\
        --extra-models vnet,transunet --json /tmp/supervised.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DEFAULT_DATASETS = ["JSRT", "Kvasir-SEG", "BUSI", "WBC", "Hippocampus"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=8.0, help="training budget per run (wall clock)")
    parser.add_argument("--datasets", default=",".join(DEFAULT_DATASETS))
    parser.add_argument("--model", default="unet", help="model trained on every dataset")
    parser.add_argument("--extra-models", default="", help="comma list, trained on --extra-dataset too")
    parser.add_argument("--extra-dataset", default="JSRT")
    parser.add_argument("--nnunet-python", type=Path, default=None)
    parser.add_argument("--nnunet-datasets", default="JSRT")
    parser.add_argument("--nsd-mm", type=float, default=2.0)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--work", type=Path, default=Path("/tmp/medseg_supervised_bench"))
    parser.add_argument("--fresh", action="store_true", help="forget cached runs in --work")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--run-one", nargs=2, metavar=("DATASET", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    if args.run_one:
        print(json.dumps(_run_medseg(args, *args.run_one)))
        return
    if args.fresh and args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    runs = [(d, args.model) for d in args.datasets.split(",") if d]
    runs += [(args.extra_dataset, m) for m in args.extra_models.split(",") if m and m != args.model]
    if args.nnunet_python is not None:
        runs += [(d, "nnunet") for d in args.nnunet_datasets.split(",") if d]
    results = []
    for dataset, model in runs:
        cached = args.work / f"{dataset}_{model}.json"
        if not cached.exists():
            print(f"running {dataset} / {model} ({args.minutes} min budget) ...", file=sys.stderr, flush=True)
            result = _run_nnunet(args, dataset) if model == "nnunet" else _child(args, dataset, model)
            cached.write_text(json.dumps(result))
        results.append(json.loads(cached.read_text()))
    _print_table(results, args)
    if args.json is not None:
        args.json.write_text(json.dumps({"minutes": args.minutes, "results": results}, indent=2))


def _child(args: argparse.Namespace, dataset: str, model: str) -> dict[str, Any]:
    """One medseg run in its own process, so that its peak memory is its own."""
    command = [sys.executable, __file__, "--run-one", dataset, model, "--minutes", str(args.minutes)]
    command += ["--work", str(args.work), "--data", str(args.data), "--nsd-mm", str(args.nsd_mm)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{dataset}/{model} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run_medseg(args: argparse.Namespace, dataset: str, model: str) -> dict[str, Any]:
    import torch

    from medseg.data import open_dataset
    from medseg.data.cases import load_case
    from medseg.engine.supervised import TrainOptions, train
    from medseg.inference.supervised_predictor import SupervisedPredictor

    torch.set_num_threads(2)
    out = args.work / f"{dataset}_{model}_run"
    if out.exists():
        shutil.rmtree(out)
    started = time.perf_counter()
    result = train(TrainOptions(args.data / dataset, out, model=model, epochs=100_000, minutes=args.minutes))
    total = time.perf_counter() - started
    plan = json.loads((out / "plan.json").read_text())
    split = json.loads((out / "split.json").read_text())
    predictor = SupervisedPredictor(out)
    cases = {c.name: c for c in open_dataset(args.data / dataset).cases}
    pairs, seconds = [], []
    for name in split["val"]:
        image, label = load_case(cases[name])
        tick = time.perf_counter()
        prediction = predictor.predict(image)
        seconds.append(time.perf_counter() - tick)
        pairs.append((prediction.labels, label, image.spacing))
    iterations = plan["training"]["iterations_per_epoch"] * plan["training"]["batch_size"]
    return {
        "dataset": dataset,
        "model": model,
        "epochs": result.epochs,
        "training_seconds": result.training_seconds,
        "setup_seconds": total - result.training_seconds,
        "patches_per_second": result.epochs * iterations / result.training_seconds,
        "patch_size": plan["patch_size"],
        "batch_size": plan["training"]["batch_size"],
        "inference_seconds_per_case": float(np.mean(seconds)),
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "val_cases": len(split["val"]),
        "scores": _scores(pairs, {int(v): k for k, v in plan["labels"].items()}, args.nsd_mm),
    }


def _scores(pairs: list[tuple[np.ndarray, np.ndarray, tuple]], names: dict[int, str], nsd_mm: float) -> dict:
    from medseg.metrics.surface import score_masks

    per_label: dict[str, dict[str, list[float]]] = {}
    for prediction, truth, spacing in pairs:
        for value, name in names.items():
            if value == 0 or not ((prediction == value).any() or (truth == value).any()):
                continue
            score = score_masks(prediction == value, truth == value, spacing, tolerance_mm=nsd_mm)
            entry = per_label.setdefault(name, {"dice": [], "nsd": []})
            entry["dice"].append(score.dice)
            entry["nsd"].append(score.nsd)
    return {n: {"dice": float(np.mean(s["dice"])), "nsd": float(np.mean(s["nsd"])), "n": len(s["dice"])}
            for n, s in per_label.items()}  # fmt: skip


def _run_nnunet(args: argparse.Namespace, dataset: str) -> dict[str, Any]:
    """nnU-Net v2 on the same split and budget, in its own Python."""
    from medseg.data import open_dataset
    from medseg.data.cases import load_case
    from medseg.io import load

    split_file = args.work / f"{dataset}_{args.model}_run" / "split.json"
    if not split_file.exists():
        raise SystemExit(f"run medseg on {dataset} first (its split is reused for nnU-Net)")
    split = json.loads(split_file.read_text())
    source = args.data / dataset
    info = json.loads((source / "dataset.json").read_text())
    base = args.work / "nnunet"
    if base.exists():
        shutil.rmtree(base)
    ident = 900 + DEFAULT_DATASETS.index(dataset) if dataset in DEFAULT_DATASETS else 950
    raw = base / "raw" / f"Dataset{ident:03d}_{dataset.replace('-', '')}"
    raw.mkdir(parents=True)
    (raw / "imagesTr").symlink_to(source / "imagesTr")
    (raw / "labelsTr").symlink_to(source / "labelsTr")
    # nnU-Net v2 reads a "modality" key as v1's per-channel dict (its length = channels): leave it out.
    (raw / "dataset.json").write_text(json.dumps({k: v for k, v in info.items() if k != "modality"}))
    env = {
        **os.environ,
        "nnUNet_raw": str(base / "raw"),
        "nnUNet_preprocessed": str(base / "preprocessed"),
        "nnUNet_results": str(base / "results"),
        "MEDSEG_BUDGET_MINUTES": str(args.minutes),
    }
    bindir = Path(args.nnunet_python).parent
    site = subprocess.run(
        [str(args.nnunet_python), "-c", "import nnunetv2, os; print(os.path.dirname(nnunetv2.__file__))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    shutil.copy(
        ROOT / "benchmarks" / "_nnunet_budget_trainer.py",
        Path(site) / "training" / "nnUNetTrainer" / "medseg_budget.py",
    )
    config = "3d_fullres" if info.get("file_ending", "").endswith((".nii.gz", ".nii")) else "2d"
    tick = time.perf_counter()
    _call([str(bindir / "nnUNetv2_plan_and_preprocess"), "-d", str(ident), "-c", config, "-np", "2"], env)
    preprocess_seconds = time.perf_counter() - tick
    preprocessed = base / "preprocessed" / raw.name
    (preprocessed / "splits_final.json").write_text(json.dumps([{"train": split["train"], "val": split["val"]}]))
    tick = time.perf_counter()
    train_log = _call(
        [
            str(bindir / "nnUNetv2_train"),
            str(ident),
            config,
            "0",
            "-tr",
            "nnUNetTrainer_medsegBudget",
            "-device",
            "cpu",
        ],
        # augmentation in the training process: nnU-Net's worker processes fail here (shared-memory fds)
        {**env, "nnUNet_n_proc_DA": "0"},
        measure=True,
    )
    train_wall = time.perf_counter() - tick
    trained = base / "results" / raw.name / f"nnUNetTrainer_medsegBudget__nnUNetPlans__{config}" / "fold_0"
    budget = json.loads((trained / "medseg_budget.json").read_text())
    inputs = base / "val_inputs"
    inputs.mkdir()
    for name in split["val"]:
        for f in (source / "imagesTr").glob(f"{name}_0*"):
            (inputs / f.name).symlink_to(f)
    predictions = base / "val_predictions"
    tick = time.perf_counter()
    _call(
        [str(bindir / "nnUNetv2_predict"), "-i", str(inputs), "-o", str(predictions), "-d", str(ident), "-c", config,
         "-f", "0", "-tr", "nnUNetTrainer_medsegBudget", "-chk", "checkpoint_final.pth", "-device", "cpu",
         "--disable_tta", "-npp", "1", "-nps", "1"],
        env,
    )  # fmt: skip
    predict_seconds = time.perf_counter() - tick
    cases = {c.name: c for c in open_dataset(source).cases}
    pairs = []
    for name in split["val"]:
        image, label = load_case(cases[name])
        predicted = load(predictions / f"{name}{info['file_ending']}").array
        pairs.append((predicted, label, image.spacing))
    labels = {int(v): k for k, v in info["labels"].items()}
    return {
        "dataset": dataset,
        "model": "nnunet",
        "epochs": budget["epochs"],
        "training_seconds": budget["training_seconds"],
        "setup_seconds": preprocess_seconds + train_wall - budget["training_seconds"],
        "patches_per_second": budget["images_per_second"],
        "patch_size": budget["patch_size"],
        "batch_size": budget["batch_size"],
        "inference_seconds_per_case": predict_seconds / len(split["val"]),
        "inference_note": "whole nnUNetv2_predict call (model loading included)",
        "peak_memory_mb": train_log["peak_memory_mb"],
        "val_cases": len(split["val"]),
        "scores": _scores(pairs, labels, args.nsd_mm),
        "nnunet_configuration": config,
    }


def _call(command: list[str], env: dict[str, str], measure: bool = False) -> dict[str, Any]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"peak_memory_mb": (peak if measure else before) / 1024}


def _print_table(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    nnunet = {r["dataset"]: r for r in results if r["model"] == "nnunet"}
    table = Table(
        title=f"Supervised, CPU 2 threads, {args.minutes:g} min training budget per run, fold 0 of 5 "
        f"(validation cases), NSD tolerance {args.nsd_mm:g} mm",
        box=box.SIMPLE_HEAD,
    )
    for column in ("dataset", "model", "label", "Dice", "NSD", "n", "mean Dice", "vs nnU-Net", "epochs",
                   "patches/s", "patch x batch", "infer s/case", "peak MB"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("dataset", "model", "label") else "right")
    for r in results:
        mean = float(np.mean([s["dice"] for s in r["scores"].values()]))
        theirs = nnunet.get(r["dataset"])
        ratio = ""
        if theirs is not None and r["model"] != "nnunet":
            ratio = f"{mean / float(np.mean([s['dice'] for s in theirs['scores'].values()])):.3f}"
        for i, (label, s) in enumerate(r["scores"].items()):
            first = i == 0
            table.add_row(
                r["dataset"] if first else "",
                r["model"] if first else "",
                label,
                f"{s['dice']:.4f}",
                f"{s['nsd']:.4f}",
                str(s["n"]),
                f"{mean:.4f}" if first else "",
                ratio if first else "",
                str(r["epochs"]) if first else "",
                f"{r['patches_per_second']:.1f}" if first else "",
                f"{'x'.join(map(str, r['patch_size']))} x {r['batch_size']}" if first else "",
                f"{r['inference_seconds_per_case']:.2f}" if first else "",
                f"{r['peak_memory_mb']:.0f}" if first else "",
            )
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
