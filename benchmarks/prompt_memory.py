"""Peak memory of ``medseg prompt --box3d`` on a 512 x 512 x 400 CT with a 40-slice box (issue 22: < 1.5 GB).

The volume is made from the LiTS CT case that ``liver-ct-segmentation-package`` ships (128^3, HU): each
slice enlarged 4x in plane (pixel repetition) and the stack repeated along z to 400 slices, stored as an
int16 NIfTI; the box is the liver's over 40 slices. A second row shifts the same values above zero so that
the percentile rule (MR and other volumes) is taken instead of the CT window. Each run is a fresh
``medseg prompt`` process; its peak resident memory is its own ``VmHWM`` (imports and the model included;
``_processes.run_measured``: until stop 31 this came from ``wait4``, which also counts this script's own peak).

    python benchmarks/prompt_memory.py [--slices 40] [--depth 400]
"""

from __future__ import annotations

import argparse
import os
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

TARGET_GB = 1.5


def write_volume(folder: Path, depth: int, shift: float, first: int, slices: int) -> tuple[Path, tuple[int, ...]]:
    """The enlarged LiTS CT (+ ``shift``) as int16 NIfTI, and the liver's in-plane box ``(x0, y0, x1, y1)`` on
    slices ``first .. first + slices - 1``."""
    source = Path(str(resources.files("liver_ct_segmentation_package") / "data"))
    ct, labels = load(source / "img_117.mrc").array, load(source / "lab_117.mrc").array
    liver = (labels == 1)[np.arange(first, first + slices) % len(labels)]
    rows, cols = np.flatnonzero(liver.any(axis=(0, 2))), np.flatnonzero(liver.any(axis=(0, 1)))
    box = (int(cols[0]) * 4, int(rows[0]) * 4, int(cols[-1] + 1) * 4, int(rows[-1] + 1) * 4)
    enlarged = np.kron(np.round(ct + shift).astype(np.int16), np.ones((1, 4, 4), np.int16))
    volume = np.concatenate([enlarged] * (depth // len(enlarged) + 1))[:depth]
    path = folder / f"ct_shift{int(shift)}.nii"
    nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0), np.diag([0.7, 0.7, 1.0, 1.0])), path)
    return path, box


def run(path: Path, box3d: str, out: Path) -> tuple[float, float, int]:
    """(peak GB, wall s, exit status) of one ``medseg prompt`` process (`run_measured`)."""
    return run_measured([sys.executable, "-m", "medseg", "prompt", str(path), "--box3d", box3d, "-o", str(out)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=40, help="slices the 3D box covers")
    parser.add_argument("--depth", type=int, default=400, help="slices of the volume")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    table = Table(title=f"medseg prompt --box3d: peak memory (target < {TARGET_GB} GB)")
    for column in ("volume", "intensity rule", "box slices", "peak GB", "met", "wall s", "exit"):
        table.add_column(column)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for shift, rule in ((0.0, "CT window"), (1100.0, "percentile (MR rule)")):
            z0 = args.depth // 2 - args.slices // 2
            path, (x0, y0, x1, y1) = write_volume(folder, args.depth, shift, z0, args.slices)
            box3d = f"{x0},{y0},{z0},{x1},{y1},{z0 + args.slices - 1}"
            peak, seconds, status = run(path, box3d, folder / f"out{int(shift)}")
            shape = "x".join(str(s) for s in (512, 512, args.depth))
            met = "yes" if peak < TARGET_GB and status == 0 else "NO"
            table.add_row(shape, rule, str(args.slices), f"{peak:.2f}", met, f"{seconds:.1f}", str(status))
            path.unlink()
    Console().print(table)
    print(f"load average before {load_before:.2f}, after {os.getloadavg()[0]:.2f} (wall s is not a speed figure)")


if __name__ == "__main__":
    main()
