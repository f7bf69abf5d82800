"""Benchmark of the workbench's flywheel: how many interactions a simulated annotator needs per image, with
prompts alone and with the flywheel (in-context drafts from every saved image, then a specialist).

Protocol (MultiverSeg-style, on any dataset in the nnU-Net raw layout):

- The first ``--images`` cases in sorted name order are copied into a fresh temporary workspace per mode and
  annotated in that order through medseg's own classes (`Workspace`, `Flywheel`, `Session`: the code behind
  ``medseg serve``), with the real LiteMedSAM weights.
- On each image the annotator sees the draft (``prompts``: none; ``flywheel``: the in-context draft from every
  image saved so far, or the specialist's once it has won its validation), then, for each foreground label of
  the task: a label the draft already gets to Dice >= ``--target`` costs nothing; a label missing from the
  draft, or whose draft lies elsewhere (the draft's bounding box overlaps the object's with an IoU under
  0.7, as a user sees a draft in the wrong place), gets a box (the tight box of the ground truth; for volumes
  its 3D box), 1 interaction; then a click
  at the interior-most point of the largest error region (positive where the mask misses, negative where it
  spills; for volumes on the slice where that 3D region is largest, refining that slice), 1 interaction
  each, until Dice >= ``--target`` or ``--max-interactions`` for that label. A label the draft shows where
  the truth has none is erased: 1 interaction. The image's interactions are the sum over its labels.
- The annotator then saves the finished annotation, which joins the support set: by default the ground
  truth (what it reached, finished with the brush: that brush work is not counted, so the table shows how
  many images reached the target with prompts alone); ``--save reached`` saves what the prompts reached. After
  ``--train-after`` saved images a specialist trains (``medseg train --minutes --train-minutes``); the
  benchmark waits for it (its minutes are reported apart, not as compute per image), and it drafts only if
  its Dice on its validation split beats the in-context engine's there.

Prints, per mode: interactions per image, the mean over images 11-N (N = ``--images``), the share of images
needing none, compute seconds per image (drafts and prompts, wall clock), the mean Dice of what was saved;
and as its last line ``ratio R``: the flywheel's mean interactions over images 11-N divided by those of
prompts alone. The line before it gives the ratio had the annotator redone every draft below the target with a
box instead of clicking on it (computed from the same run: the box path does not depend on the draft).
``--from-json`` prints the tables of an earlier run's ``--json`` records.

Run from the repository root, alone on the machine (times are wall clock)::

    python benchmarks/workbench.py --dataset ../shared/data/JSRT --images 50
    python benchmarks/workbench.py --dataset ../shared/data/Hippocampus --images 20 --json /tmp/wb_hippo.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data import open_dataset
from medseg.inference.click_simulation import interior_point, largest_error, next_click
from medseg.inference.engines import InContextEngine, PromptEngine
from medseg.io import load
from medseg.io.formats import split_extension
from medseg.metrics import dice
from medseg.server.flywheel import Flywheel
from medseg.server.sessions import Session
from medseg.server.workspace import Workspace

SKIP_FIRST = 10  # the mean is over the images after these (MultiverSeg's 11-50)
DRAFT_BOX_IOU = 0.7  # a draft whose bounding box overlaps the object's less than this is replaced by a box


@dataclass
class ImageRecord:
    """One annotated image: interactions, the draft's engine and Dice, the saved Dice, compute seconds."""

    index: int
    case: str
    interactions: int
    draft_engine: str | None
    draft_dice: float | None
    reached_dice: float
    seconds: float
    per_label: dict[int, int] = field(default_factory=dict)
    reached_target: bool = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, required=True, help="A dataset in the nnU-Net raw layout.")
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--modes", default="prompts,flywheel")
    parser.add_argument("--target", type=float, default=0.90, help="Dice at which the annotator stops.")
    parser.add_argument("--max-interactions", type=int, default=20, help="Per label and image.")
    parser.add_argument("--train-after", type=int, default=20, help="0: no specialist.")
    parser.add_argument("--train-minutes", type=float, default=3.0)
    parser.add_argument(
        "--save",
        choices=("truth", "reached"),
        default="truth",
        help="What the annotator saves: the ground truth (a finished annotation, the rest done with the brush, "
        "uncounted) or the mask its prompts reached.",
    )
    parser.add_argument("--json", type=Path, default=None, help="Also write the per-image records here.")
    parser.add_argument("--from-json", type=Path, default=None, help="Print the tables of an earlier --json run.")
    args = parser.parse_args()
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        training = saved.pop("training", {})
        results = {mode: [ImageRecord(**r) for r in records] for mode, records in saved.items()}
        args.images = max(len(r) for r in results.values())
        _print(results, training, args)
        return
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - {"prompts", "flywheel"}
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)} (known: prompts, flywheel)")
    dataset = open_dataset(args.dataset)
    cases = sorted((c for c in dataset.cases if c.label is not None), key=lambda c: c.name)[: args.images]
    if len(cases) <= SKIP_FIRST:
        parser.error(f"{len(cases)} labelled cases: give a dataset with more than {SKIP_FIRST}")
    prompt_engine = PromptEngine.from_pretrained()
    results: dict[str, list[ImageRecord]] = {}
    extra: dict[str, Any] = {}
    for mode in modes:
        with tempfile.TemporaryDirectory(prefix=f"medseg-workbench-{mode}-") as folder:
            workspace = _workspace(Path(folder), args.dataset, cases)
            incontext = InContextEngine.from_pretrained("probe") if mode == "flywheel" else None
            flywheel = Flywheel(workspace, incontext, train_after=args.train_after if mode == "flywheel" else 0,
                                train_minutes=args.train_minutes, prompt_engine=prompt_engine)  # fmt: skip
            results[mode] = _annotate(mode, workspace, flywheel, prompt_engine, cases, args)
            extra[mode] = flywheel.status()["training"]
    _print(results, extra, args)
    if args.json is not None:
        args.json.write_text(
            json.dumps({m: [asdict(r) for r in rs] for m, rs in results.items()} | {"training": extra}, indent=1)
        )


def _workspace(folder: Path, dataset: Path, cases: list[Any]) -> Workspace:
    """A workspace of copies of the cases' images (``<case><ext>``) with the dataset's ``dataset.json``."""
    for case in cases:
        ext = split_extension(case.images[0])[1]
        shutil.copyfile(case.images[0], folder / f"{case.name}{ext}")
    shutil.copyfile(dataset / "dataset.json", folder / "dataset.json")
    return Workspace(folder)


def _annotate(
    mode: str, workspace: Workspace, flywheel: Flywheel, engine: PromptEngine, cases: list[Any], args: Any
) -> list[ImageRecord]:
    values = [v for v in workspace.labels.values() if v != 0]
    records = []
    for index, case in enumerate(cases, start=1):
        truth = np.asarray(load(case.label).array).astype(np.int64)
        image = workspace.image(case.name)
        started = time.perf_counter()
        draft = flywheel.draft(case.name, keep=False) if mode == "flywheel" else None
        session = Session(case.name, image, engine, labels=None if draft is None else draft.labels)
        draft_dice = None if draft is None else _mean_dice(draft.labels, truth, values)
        per_label, label_dice = {}, {}
        for v in values:  # each label's Dice as its own annotation ends (a later label's prompts may take pixels)
            per_label[v] = _annotate_label(session, truth == v, v, args)
            label_dice[v] = dice(session.labels == v, truth == v)
        seconds = time.perf_counter() - started
        flywheel.save(case.name, truth if args.save == "truth" else session.labels, train=False)
        reached = all(d >= args.target or not (truth == v).any() for v, d in label_dice.items())
        record = ImageRecord(index, case.name, sum(per_label.values()), None if draft is None else draft.engine,
                             draft_dice, float(np.mean(list(label_dice.values()))), seconds, per_label,
                             reached)  # fmt: skip
        records.append(record)
        print(
            f"{mode} {index:3d} {case.name}: {record.interactions:2d} interactions {per_label}, draft "
            f"{record.draft_engine} {_fmt(draft_dice)}, reached Dice {record.reached_dice:.3f}, {seconds:.1f} s",
            flush=True,
        )
        if mode == "flywheel" and index < len(cases) and flywheel.due():  # no run after the last image
            started = time.perf_counter()
            status = flywheel.start_training(wait=True)
            print(f"specialist after {index} images ({time.perf_counter() - started:.0f} s): {status.message}",
                  flush=True)  # fmt: skip
    return records


def _annotate_label(session: Session, truth: np.ndarray, value: int, args: Any) -> int:
    """Interactions the simulated annotator spends on one label of one image."""
    current = session.labels == value
    if not truth.any():
        if current.any():  # erase a label the draft shows where there is none
            session.set_labels(np.where(current, 0, session.labels))
            return 1
        return 0
    if current.any() and dice(current, truth) >= args.target:
        return 0
    count = 0
    if not current.any() or _box_iou(current, truth) < DRAFT_BOX_IOU:  # no draft, or one in the wrong place
        count += 1
        if truth.ndim == 3:
            zs, ys, xs = np.nonzero(truth)
            session.box3d(value, (xs.min(), ys.min(), zs.min(), xs.max() + 1, ys.max() + 1, zs.max()))
        else:
            ys, xs = np.nonzero(truth)
            session.box(value, (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
        current = session.labels == value
    while dice(current, truth) < args.target and count < args.max_interactions:
        click = _click(current, truth)
        if click is None:
            break
        (x, y), z, positive = click
        session.click(value, x, y, positive, z)
        count += 1
        current = session.labels == value
    return count


def _click(pred: np.ndarray, truth: np.ndarray) -> tuple[tuple[int, int], int | None, bool] | None:
    """The next corrective click ``((x, y), z, positive)``: 2D as `next_click`; 3D on the slice where the
    largest 3D error region is largest."""
    if pred.ndim == 2:
        click = next_click(pred, truth)
        return None if click is None else (click[0], None, bool(click[1]))
    found = largest_error(pred, truth)
    if found is None:
        return None
    region = found[0]
    z = int(np.argmax(region.sum(axis=(1, 2))))
    return interior_point(region[z]), z, bool(found[1])


def _box_iou(mask: np.ndarray, truth: np.ndarray) -> float:
    """IoU of the bounding boxes (2D or 3D) of two non-empty masks."""
    a, b = np.argwhere(mask), np.argwhere(truth)
    low, high = np.maximum(a.min(0), b.min(0)), np.minimum(a.max(0), b.max(0)) + 1
    inter = float(np.prod(np.clip(high - low, 0, None)))
    size_a, size_b = float(np.prod(a.max(0) + 1 - a.min(0))), float(np.prod(b.max(0) + 1 - b.min(0)))
    return inter / (size_a + size_b - inter)


def _box_fallback(prompts: list[ImageRecord], flywheel: list[ImageRecord]) -> list[int]:
    """Interactions per image had the annotator redone every draft below the target with a box: per label, 0
    where the draft was accepted, the erasing where the truth has none, else the prompts run's count (same
    image, same box, same clicks: that path does not depend on the draft)."""
    counts = []
    for alone, drafted in zip(prompts, flywheel, strict=True):
        total = 0
        for label, used in drafted.per_label.items():
            boxed = alone.per_label[label]
            total += 0 if used == 0 else used if boxed == 0 else boxed
        counts.append(total)
    return counts


def _mean_dice(pred: np.ndarray, truth: np.ndarray, values: list[int]) -> float:
    return float(np.mean([dice(pred == v, truth == v) for v in values]))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _print(results: dict[str, list[ImageRecord]], training: dict[str, Any], args: Any) -> None:
    modes = list(results)
    n = max(len(r) for r in results.values())
    print(f"\n## {args.dataset.name}: interactions per image (target Dice {args.target}, "
          f"at most {args.max_interactions} per label)\n")  # fmt: skip
    print("| image | " + " | ".join(f"{m} | draft" for m in modes) + " |")
    print("|---|" + "---|---|" * len(modes))
    for i in range(n):
        cells = []
        for m in modes:
            r = results[m][i]
            cells.append(f"{r.interactions} | {r.draft_engine or '-'} {_fmt(r.draft_dice)}")
        print(f"| {i + 1} | " + " | ".join(cells) + " |")
    print(f"\n| mode | mean interactions, images {SKIP_FIRST + 1}-{n} | images 1-{n} | share needing none "
          f"({SKIP_FIRST + 1}-{n}) | compute s per image | Dice reached | images reaching the target |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    means = {}
    for m in modes:
        rs = results[m]
        later = [r.interactions for r in rs[SKIP_FIRST:]]
        means[m] = float(np.mean(later))
        none = float(np.mean([c == 0 for c in later]))
        print(f"| {m} | {means[m]:.2f} | {np.mean([r.interactions for r in rs]):.2f} | {none:.0%} | "
              f"{np.median([r.seconds for r in rs]):.1f} (median), {np.mean([r.seconds for r in rs]):.1f} (mean) | "
              f"{np.mean([r.reached_dice for r in rs]):.3f} | "
              f"{np.mean([r.reached_target for r in rs]):.0%} |")  # fmt: skip
    if "flywheel" in training:
        for run in training["flywheel"].get("history", []):
            print(f"specialist run {run['run']} on {run['images']} images: validation Dice specialist "
                  f"{run['specialist']:.3f}, in-context {_fmt(run['incontext'])}")  # fmt: skip
    if "prompts" in means and "flywheel" in means:
        fallback = _box_fallback(results["prompts"], results["flywheel"])[SKIP_FIRST:]
        print(f"\nflywheel, a draft below the target redone with a box (the prompts run's count for that label; "
              f"the box path never reads the draft): mean {np.mean(fallback):.2f} over images {SKIP_FIRST + 1}-{n}, "
              f"ratio {np.mean(fallback) / means['prompts']:.3f}")  # fmt: skip
        ratio = means["flywheel"] / means["prompts"] if means["prompts"] > 0 else float("nan")
        print(f"ratio {ratio:.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
