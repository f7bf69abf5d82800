"""Score predicted label maps against ground truth: per case and label DSC, NSD and HD95."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.data.label_files import LOSSY_LABEL_FORMATS
from medseg.errors import MedsegError
from medseg.evaluation.pairing import CasePair
from medseg.io import Image, as_label_array, load
from medseg.metrics import score_label_maps

METRICS = ("dice", "nsd", "hd95_mm")


@dataclass(frozen=True)
class CaseLabelResult:
    """One row of the per-case table."""

    case: str
    label: int
    label_name: str
    dice: float
    nsd: float
    hd95_mm: float


@dataclass
class Evaluation:
    """All rows, the scoring settings, and the label names used."""

    rows: list[CaseLabelResult]
    labels: dict[int, str]
    tolerance_mm: float
    pairs: list[CasePair] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        """Mean, median, std (population) and count of each metric per label, and the mean over labels."""
        per_label: dict[str, object] = {}
        for value, name in self.labels.items():
            rows = [r for r in self.rows if r.label == value]
            per_label[str(value)] = {"name": name, **{m: _stats([getattr(r, m) for r in rows]) for m in METRICS}}
        mean_dice = [float(np.mean([r.dice for r in self.rows if r.label == v])) for v in self.labels]
        return {
            "cases": len(self.pairs) if self.pairs else len({r.case for r in self.rows}),
            "tolerance_mm": self.tolerance_mm,
            "labels": per_label,
            "mean_dice_over_labels": float(np.mean(mean_dice)) if mean_dice else math.nan,
            "empty_mask_convention": "both empty: dice=nsd=1, hd95=0; one empty: dice=nsd=0, hd95=image diagonal (mm)",
        }

    def case_mean_dice(self) -> dict[str, float]:
        """Mean Dice over labels for each case (used to pick the best and worst cases)."""
        cases: dict[str, list[float]] = {}
        for r in self.rows:
            cases.setdefault(r.case, []).append(r.dice)
        return {c: float(np.mean(v)) for c, v in cases.items()}


def load_pair(pair: CasePair) -> tuple[Image, np.ndarray, np.ndarray]:
    """Read one pair as label arrays; the ground-truth `Image` is returned for its geometry.

    Raises:
        MedsegError: unreadable files, a lossy (JPEG) label map, non-label content, different shape or geometry.
    """
    gt = load(pair.gt, key=_npz_key(pair.gt, "gts"))
    pred = load(pair.pred, key=_npz_key(pair.pred, "segs"))
    for image, path in ((gt, pair.gt), (pred, pair.pred)):
        if image.meta.get("format") in LOSSY_LABEL_FORMATS:  # every edge's grey value would score as a class
            raise MedsegError(
                f"a {str(image.meta['format']).upper()} label map is lossy (compression adds grey values at every "
                "edge): re-export it as PNG",
                path,
            )
    pred_array, gt_array = as_label_array(pred), as_label_array(gt)
    if pred.shape != gt.shape:
        raise MedsegError(f"shape {pred.shape} differs from ground truth {pair.gt} shape {gt.shape}", pair.pred)
    if not pred.geometry.matches(gt.geometry):
        raise MedsegError(
            f"geometry differs from ground truth {pair.gt}: {pred.geometry.describe_difference(gt.geometry)}",
            pair.pred,
        )
    return gt, pred_array, gt_array


def evaluate_pairs(
    pairs: Sequence[CasePair],
    labels: dict[int, str] | None = None,
    declared: set[int] | None = None,
    tolerance_mm: float = 2.0,
    on_case: Callable[[CasePair], None] | None = None,
) -> Evaluation:
    """Score every pair.

    Args:
        pairs: from `pair_cases`.
        labels: {value: name} to score; None scores every non-zero value found in the ground truth
            or the predictions (named ``label_<v>``).
        declared: label values allowed in the files (from dataset.json); a file holding any other
            value is an error. None allows any value.
        tolerance_mm: NSD tolerance.
        on_case: called after each pair (progress).

    Raises:
        MedsegError: as `load_pair`, a file holds labels not in ``declared``, or the tolerance is not finite.
    """
    if not np.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise MedsegError(f"the NSD tolerance must be a finite number of mm >= 0, got {tolerance_mm}")
    rows: list[CaseLabelResult] = []
    found: set[int] = set()
    for pair in pairs:
        gt, pred_array, gt_array = load_pair(pair)
        present: set[int] = set()
        for path, array in ((pair.pred, pred_array), (pair.gt, gt_array)):
            values = {int(v) for v in np.unique(array)}
            if declared is not None and not values <= declared:
                extra = sorted(values - declared)
                raise MedsegError(f"label values {extra} are not in the dataset's labels {sorted(declared)}", path)
            present |= values
        found |= present
        to_score = list(labels) if labels is not None else sorted(present - {0})
        scores = score_label_maps(pred_array, gt_array, to_score, gt.spacing, tolerance_mm)
        name = (labels or {}).get
        rows.extend(
            CaseLabelResult(pair.case, v, name(v, f"label_{v}"), s.dice, s.nsd, s.hd95_mm) for v, s in scores.items()
        )
        if on_case is not None:
            on_case(pair)
    if labels is None:
        # Labels absent from both files of a case were not scored there: both empty is a perfect score.
        labels = {v: f"label_{v}" for v in sorted(found - {0})}
        scored = {(r.case, r.label) for r in rows}
        rows.extend(
            CaseLabelResult(p.case, v, labels[v], 1.0, 1.0, 0.0)
            for p in pairs
            for v in labels
            if (p.case, v) not in scored
        )
        rows.sort(key=lambda r: (r.case, r.label))
    return Evaluation(rows=rows, labels=labels, tolerance_mm=tolerance_mm, pairs=list(pairs))


def _npz_key(path: Path, preferred: str) -> str | None:
    """The label array of a MedSAM-style npz: ``preferred`` (``segs``/``gts``), or its only array.

    Raises:
        MedsegError: an npz with several arrays but not ``preferred`` (an image would be scored).
    """
    if path.suffix.lower() != ".npz":
        return None
    from medseg.io.numpy_io import npz_keys

    keys = npz_keys(path)
    if preferred in keys:
        return preferred
    arrays = [k for k in keys if k not in ("spacing", "origin", "direction")]
    if len(arrays) == 1:
        return arrays[0]
    raise MedsegError(f"npz holds {keys} but no '{preferred}' label array", path)


def _stats(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"mean": math.nan, "median": math.nan, "std": math.nan, "count": 0}
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "median": float(np.median(a)), "std": float(a.std()), "count": len(values)}
