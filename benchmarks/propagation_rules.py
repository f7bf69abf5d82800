"""The experiment that chose medseg's 3D-box propagation rules, on structures the benchmark does not report.

``benchmarks/prompt.py --only volumes`` reports 2 Hippocampus volumes (its seeded draw) and 20 AAL regions
(every sixth label from 1). This script scores candidate rules on *other* structures: Hippocampus volumes
6-15 of the same seeded order, and the 20 AAL regions 4, 10, ..., 118 (every sixth label from 4). The LiTS CT
case is not used here (there is only one): it stays data no rule saw.

Each structure is prompted with its ground-truth 3D bounding box. Slice embeddings are computed once and kept
in ``--work`` (4 MB a slice), so a rerun costs only decoder calls. Printed: mean 3D Dice per group and rule.

    python benchmarks/propagation_rules.py --mricron /tmp/mricron/usr/share/mricron/templates
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from _prompt_pipeline import Slices, box3d, box_per_slice, medseg_3d, projected_box
from _volumes import MRICRON, Structure, _aal_names

from medseg.data import open_dataset
from medseg.inference.prompt_predictor import PromptPredictor
from medseg.inference.propagation import bounding_box
from medseg.io import load
from medseg.metrics import dice

ROOT = Path(__file__).resolve().parents[1]
DEV_AAL = tuple(range(4, 117, 6))


def dev_structures(data: Path, mricron: Path) -> Iterator[Structure]:
    dataset = open_dataset(data / "Hippocampus")
    names = dataset.label_names()
    order = np.random.default_rng([0, zlib.crc32(dataset.name.encode())]).permutation(len(dataset.cases))
    for index in order[5:15]:
        case = dataset.cases[int(index)]
        image, labels = load(case.images[0]), np.asarray(load(case.label).array)
        for value in dataset.foreground_labels():
            if (labels == value).any():
                yield Structure("Hippocampus", f"{value} {names.get(value, value)}", case.name, image, labels == value)
    if (mricron / "aal.nii.gz").is_file():
        image, atlas = load(mricron / "ch2.nii.gz"), np.asarray(load(mricron / "aal.nii.gz").array)
        aal = _aal_names(mricron / "aal.nii.txt")
        for value in DEV_AAL:
            if (atlas == value).any():
                yield Structure("Colin27 AAL", "dev regions", aal.get(value, str(value)), image, atlas == value)


class DiskCachedSlices(Slices):
    """`Slices` whose embeddings also persist in a folder (the predictor's cache, filled from disk)."""

    def __init__(self, predictor: PromptPredictor, structure: Structure, key: str, work: Path) -> None:
        super().__init__(predictor, structure.image, key)
        self.folder = work / key.replace("/", "_")
        self.folder.mkdir(parents=True, exist_ok=True)

    def decode(self, z: int, box):  # type: ignore[no-untyped-def]
        cache_key = (self.key, z)
        path = self.folder / f"{z}.pt"
        cache = self.predictor._cache
        if cache_key not in cache and path.is_file():
            cache[cache_key] = torch.load(path)
        result = super().decode(z, box)
        if not path.is_file():
            torch.save(cache[cache_key], path)
        return result


Rule = Callable[[Slices, tuple[float, ...]], np.ndarray]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--mricron", type=Path, default=MRICRON)
    parser.add_argument("--work", type=Path, default=Path("/tmp/propagation_rules"))
    parser.add_argument("--rules", default="", help="comma-separated rule names (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    import propagation_candidates as candidates

    rules: dict[str, Rule] = {"projected box (a)": projected_box, "medseg now": medseg_3d, **candidates.RULES}
    if args.rules:
        rules = {k: v for k, v in rules.items() if k in args.rules.split(",")}
    predictor = PromptPredictor.from_checkpoint()
    predictor.cache_size = 100_000
    scores: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    started = time.perf_counter()
    for structure in dev_structures(args.data, args.mricron):
        key = f"{structure.source}/{structure.case if structure.source != 'Colin27 AAL' else ''}"
        volume = DiskCachedSlices(predictor, structure, key, args.work)
        box = box3d(structure.truth)
        row = scores[(structure.source, structure.group)]
        row["box per slice (b)"].append(dice(box_per_slice(volume, structure.truth), structure.truth))
        for name, rule in rules.items():
            row[name].append(dice(rule(volume, box), structure.truth))
        print(
            f"{time.perf_counter() - started:6.0f}s {structure.source} {structure.case} "
            + " ".join(f"{k}={v[-1]:.3f}" for k, v in row.items()),
            file=sys.stderr,
        )
        if structure.source != "Colin27 AAL":
            predictor.clear_cache()
    names = ["box per slice (b)", *rules]
    print("group | n | " + " | ".join(names))
    for (source, group), row in scores.items():
        print(f"{source} {group} | {len(row[names[0]])} | " + " | ".join(f"{np.mean(row[n]):.3f}" for n in names))
    everything = {n: [v for row in scores.values() for v in row[n]] for n in names}
    print(
        "all | " + str(len(everything[names[0]])) + " | " + " | ".join(f"{np.mean(everything[n]):.3f}" for n in names)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["bounding_box"]
