"""``medseg incontext`` on volumes, end to end (issue 18 item 4): wall time, peak memory and Dice per run.

Each row is a fresh ``medseg incontext`` process (imports, model load, the supports' work and the query
included); its peak resident memory is its own ``VmHWM`` (`_processes.run_measured`). Rows:

- the README's Hippocampus example: support volumes hippocampus_090-092, query hippocampus_093 (target: 15 s
  on 2 idle cores), with the default probe (one position-aware fit per label) and ``--slice-bins 0`` (the
  previous default: a fit per query slice from the support slices at its relative depth);
- a 512 x 512 x 300 CT as support and as query (target: 4 GB): the LiTS case that
  ``liver-ct-segmentation-package`` ships (128^3, HU, liver and tumour), each slice enlarged 4x in plane
  (pixel repetition) and the stack repeated along z to 300 slices (int16 NIfTI; labels likewise). The query
  is the support itself, so its Dice is a check that nothing was lost on the way, not an accuracy figure.

    python benchmarks/incontext_volume.py [--skip-ct] [--skip-hippocampus] [--skip-matched] [--repeats N]

With ``--repeats N`` each Hippocampus row runs N times (a shared machine's speed moves by a third from one run
to the next): the wall column gives the median and the fastest, the Dice is the last run's (every run gives
the same masks).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
from _processes import run_measured
from rich.console import Console
from rich.table import Table

from medseg.io import load
from medseg.metrics.surface import dice

ROOT = Path(__file__).resolve().parents[1]
HIPPOCAMPUS = ROOT.parent / "shared" / "data" / "Hippocampus"
SUPPORTS = ("hippocampus_090", "hippocampus_091", "hippocampus_092")
QUERY = "hippocampus_093"


def run(arguments: list[str]) -> tuple[float, float, int]:
    """(peak GB, wall s, exit status) of one ``medseg incontext`` process (`run_measured`)."""
    return run_measured([sys.executable, "-m", "medseg", "incontext", *arguments])


def scores(folder: Path, name: str, truth: np.ndarray, values: tuple[int, ...]) -> str:
    """Dice per label of the label map ``folder/name.*`` (the query's own format), or "-" without one."""
    found = sorted(folder.glob(f"{name}.*"))
    if not found:
        return "-"
    labels = np.asarray(load(found[0]).array)
    return " / ".join(f"{dice(labels == v, truth == v):.3f}" for v in values)


def hippocampus_rows(folder: Path, table: Table, repeats: int, matched: bool) -> None:
    support = folder / "hippo_support"
    for sub in ("images", "masks"):
        (support / sub).mkdir(parents=True)
    for case in SUPPORTS:
        shutil.copy(HIPPOCAMPUS / "imagesTr" / f"{case}_0000.nii.gz", support / "images" / f"{case}.nii.gz")
        shutil.copy(HIPPOCAMPUS / "labelsTr" / f"{case}.nii.gz", support / "masks" / f"{case}.nii.gz")
    query = HIPPOCAMPUS / "imagesTr" / f"{QUERY}_0000.nii.gz"
    truth = np.asarray(load(HIPPOCAMPUS / "labelsTr" / f"{QUERY}.nii.gz").array)
    engines = [("probe (default)", [])] + ([("probe --slice-bins 0", ["--slice-bins", "0"])] if matched else [])
    for name, extra in engines:
        out = folder / f"out_{len(extra)}"
        runs = []
        for _ in range(repeats):
            shutil.rmtree(out, ignore_errors=True)
            runs.append(run(["--support", str(support), "--query", str(query), "-o", str(out), *extra]))
        dices = scores(out, QUERY, truth, (1, 2))
        walls = sorted(seconds for _, seconds, _ in runs)
        wall = f"{walls[0]:.1f}" if repeats == 1 else f"{float(np.median(walls)):.1f} ({walls[0]:.1f})"
        peak, status = max(p for p, _, _ in runs), max(s for _, _, s in runs)
        table.add_row("Hippocampus 093 from 090-092", name, dices, wall, f"{peak:.2f}", str(status))


def ct_row(folder: Path, depth: int, table: Table) -> None:
    source = Path(str(resources.files("liver_ct_segmentation_package") / "data"))
    ct, labels = load(source / "img_117.mrc").array, load(source / "lab_117.mrc").array
    support = folder / "ct_support"
    for sub in ("images", "masks"):
        (support / sub).mkdir(parents=True)
    affine = np.diag([0.7, 0.7, 1.0, 1.0])
    image_path, label_path = support / "images" / "ct.nii", support / "masks" / "ct.nii"
    enlarged = np.kron(np.round(ct).astype(np.int16), np.ones((1, 4, 4), np.int16))
    volume = np.concatenate([enlarged] * (depth // len(enlarged) + 1))[:depth]
    nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0), affine), image_path)
    label_volume = np.kron(np.asarray(labels, np.uint8), np.ones((1, 4, 4), np.uint8))
    label_volume = np.concatenate([label_volume] * (depth // len(label_volume) + 1))[:depth]
    nib.save(nib.Nifti1Image(label_volume.transpose(2, 1, 0), affine), label_path)
    query = folder / "ct_query.nii"
    shutil.copy(image_path, query)
    del enlarged, volume
    out = folder / "ct_out"
    peak, seconds, status = run(["--support", str(support), "--query", str(query), "-o", str(out)])
    truth = np.asarray(load(label_path).array)
    dices = scores(out, "ct_query", truth, (1, 2))
    table.add_row(f"CT 512 x 512 x {depth} (support = query)", "probe (default)", dices, f"{seconds:.1f}",
                  f"{peak:.2f}", str(status))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=300, help="slices of the CT")
    parser.add_argument("--skip-ct", action="store_true")
    parser.add_argument("--skip-hippocampus", action="store_true")
    parser.add_argument("--skip-matched", action="store_true", help="no --slice-bins 0 row")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each Hippocampus row (median and fastest)")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    table = Table(title="medseg incontext on volumes, end to end (targets: Hippocampus 15 s, CT 4 GB)")
    wall = "wall s" if args.repeats == 1 else f"wall s, median (fastest) of {args.repeats}"
    for column in ("task", "engine", "Dice (labels 1 / 2)", wall, "peak GB", "exit"):
        table.add_column(column)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_hippocampus:
            hippocampus_rows(Path(tmp), table, args.repeats, not args.skip_matched)
        if not args.skip_ct:
            ct_row(Path(tmp), args.depth, table)
    Console().print(table)
    print(f"load average before {load_before:.2f}, after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
