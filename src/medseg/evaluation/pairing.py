"""Pair prediction and ground-truth files by case name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medseg.errors import MedsegError
from medseg.io.formats import format_of, is_image_file, split_extension


@dataclass(frozen=True)
class CasePair:
    """One prediction file and its ground truth."""

    case: str
    pred: Path
    gt: Path


def case_name(path: Path) -> str:
    """The case a file belongs to: its name without extension (a DICOM folder: the folder name)."""
    return path.name if path.is_dir() else split_extension(path)[0]


def pair_cases(pred: Path, gt: Path, predicted_only: bool = False) -> list[CasePair]:
    """Pair ``pred`` and ``gt``: two files, or two folders matched by case name.

    With ``predicted_only``, ground-truth cases without a prediction are left out (as nnU-Net's
    folder evaluation does); otherwise a missing prediction is an error, so that a forgotten case
    cannot inflate the scores.

    Raises:
        MedsegError: a path is missing, one is a file and the other a folder, a folder holds no
            readable files, or a case has no partner (naming the file without one).
    """
    for p in (pred, gt):
        if not p.exists():
            raise MedsegError("no such file or folder", p)
    pred_is_set, gt_is_set = _is_collection(pred), _is_collection(gt)
    if not pred_is_set and not gt_is_set:
        format_of(pred), format_of(gt)  # unknown extensions fail here, before any work
        return [CasePair(case_name(gt), pred, gt)]
    if pred_is_set != gt_is_set:
        raise MedsegError("prediction and ground truth must both be files or both be folders", pred)
    preds, gts = _cases_in(pred), _cases_in(gt)
    for case, path in preds.items():
        if case not in gts:
            raise MedsegError(f"no ground truth for case '{case}' in {gt}", path)
    for case, path in gts.items():
        if case not in preds and not predicted_only:
            raise MedsegError(f"no prediction for case '{case}' in {pred} (--predicted-only scores the others)", path)
    return [CasePair(case, preds[case], gts[case]) for case in sorted(preds)]


def _is_collection(path: Path) -> bool:
    """A folder of files (not a DICOM series folder, which is one image)."""
    if not path.is_dir():
        return False
    return (
        any(is_image_file(p) for p in path.iterdir() if p.is_file())
        or not any(path.iterdir())
        or any(p.is_dir() for p in path.iterdir())
    )


def _may_be_series(path: Path) -> bool:
    """A sub-folder that could be a DICOM series: no non-DICOM image files in it (``predict``'s
    ``probabilities/`` folder of .npz files is skipped)."""
    if not path.is_dir():
        return False
    return not any(is_image_file(p) and not p.name.lower().endswith(".dcm") for p in path.iterdir() if p.is_file())


def _cases_in(folder: Path) -> dict[str, Path]:
    cases: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not (is_image_file(p) or _may_be_series(p)):
            continue
        name = case_name(p)
        if name in cases:
            raise MedsegError(f"two files for case '{name}' ({cases[name].name}, {p.name})", p)
        cases[name] = p
    if not cases:
        raise MedsegError("folder holds no image files", folder)
    return cases
