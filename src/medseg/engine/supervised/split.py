"""Training/validation splits: k-fold over the case names with a fixed seed, or a given validation list,
and the low-data setting (``num_labelled`` training cases drawn with a fixed seed)."""

from __future__ import annotations

import numpy as np

from medseg.errors import MedsegError


def make_split(
    names: list[str],
    fold: int = 0,
    folds: int = 5,
    val_cases: list[str] | None = None,
    num_labelled: int | None = None,
    seed: int = 0,
) -> dict[str, list[str]]:
    """``{"train": [...], "val": [...]}``, each sorted.

    k-fold: the names sorted, shuffled with ``seed``, cut into ``folds`` nearly equal parts; part ``fold``
    validates. ``val_cases`` replaces that. ``num_labelled`` keeps that many training cases, drawn with
    ``seed`` (the validation cases stay the same, so runs with different N are comparable).

    Raises:
        MedsegError: fewer than two cases, a fold out of range, unknown validation names, or
            ``num_labelled`` outside ``1 .. len(train)``.
    """
    ordered = sorted(names)
    if len(ordered) < 2:
        raise MedsegError(f"training needs at least two labelled cases (one for validation), found {len(ordered)}")
    if val_cases is not None:
        unknown = sorted(set(val_cases) - set(ordered))
        if unknown:
            raise MedsegError(f"validation cases not in the dataset: {', '.join(unknown[:5])}")
        val = sorted(set(val_cases))
    else:
        if not 2 <= folds <= len(ordered):
            raise MedsegError(
                f"--folds {folds} needs between 2 and {len(ordered)} folds for {len(ordered)} labelled cases "
                f"(pass --folds {min(5, len(ordered))} or --val-cases)"
            )
        if not 0 <= fold < folds:
            raise MedsegError(f"--fold must be in 0..{folds - 1}, got {fold}")
        shuffled = [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]
        val = sorted(np.array_split(np.array(shuffled, dtype=object), folds)[fold].tolist())
    train = [n for n in ordered if n not in set(val)]
    if not train or not val:
        raise MedsegError("the split leaves no training or no validation cases")
    if num_labelled is not None:
        if not 1 <= num_labelled <= len(train):
            raise MedsegError(f"--num-labelled must be between 1 and {len(train)} (training cases), got {num_labelled}")
        picked = np.random.default_rng(seed + 1).choice(len(train), num_labelled, replace=False)
        train = sorted(train[i] for i in picked)
    return {"train": train, "val": val}
