"""The evaluation figure: Dice per label as box plots, and overlays of the worst and best cases."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medseg.evaluation.evaluate import Evaluation, load_pair
from medseg.io import load

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def draw_figure(evaluation: Evaluation, path: Path, image_for_case: Callable[[str], Path | None] | None = None) -> None:
    """Save a PNG: left, Dice distribution per label; right, worst and best case overlays.

    Overlays show ground-truth contours (solid) and predicted contours (dashed) per label on the
    case's image when ``image_for_case`` finds one, else on the ground truth. 3D cases show the axial
    slice (array axis 0) with the most ground-truth foreground.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = evaluation.case_mean_dice()
    ranked = sorted(means, key=lambda c: (means[c], c))
    shown = [(ranked[0], "worst"), (ranked[-1], "best")] if len(ranked) > 1 else [(c, "case") for c in ranked]
    ratios = [1.3] + [1.0] * len(shown)
    size = (5 + 5 * len(shown), 4.8)
    fig, grid = plt.subplots(1, 1 + len(shown), figsize=size, gridspec_kw={"width_ratios": ratios}, squeeze=False)
    axes = grid[0]
    _dice_boxes(axes[0], evaluation)
    for ax, (case, title) in zip(axes[1:], shown, strict=True):
        name = case if len(case) <= 32 else case[:14] + "..." + case[-14:]
        _overlay(ax, evaluation, case, f"{title}: {name} (mean Dice {means[case]:.3f})", image_for_case)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _dice_boxes(ax: Axes, evaluation: Evaluation) -> None:
    names, data = [], []
    for value, name in evaluation.labels.items():
        names.append(f"{value}: {name}")
        data.append([r.dice for r in evaluation.rows if r.label == value])
    if data:
        ax.boxplot(data, showfliers=False)
        rng = np.random.default_rng(0)
        for i, values in enumerate(data, start=1):
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(values)), values, s=8, alpha=0.6, color="tab:blue")
        ax.set_xticks(range(1, len(names) + 1), names, rotation=20)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Dice (DSC)")
    n_cases = len(evaluation.case_mean_dice())
    ax.set_title(f"Dice per label ({n_cases} case{'s' if n_cases != 1 else ''})")
    ax.grid(axis="y", alpha=0.3)


def _overlay(
    ax: Axes, evaluation: Evaluation, case: str, title: str, image_for_case: Callable[[str], Path | None] | None
) -> None:
    pair = next(p for p in evaluation.pairs if p.case == case)
    gt_image, pred, gt = load_pair(pair)
    background = None
    image_path = image_for_case(case) if image_for_case else None
    if image_path is not None:
        image = load(image_path)
        if image.shape == gt_image.shape:
            background = image.array
    if gt.ndim == 3:
        fg = (gt > 0).reshape(gt.shape[0], -1).sum(1)
        k = int(np.argmax(fg)) if fg.any() else gt.shape[0] // 2
        pred, gt = pred[k], gt[k]
        background = None if background is None else background[k]
        title += f", slice {k}"
    spacing = gt_image.spacing[-2:]
    if background is None:  # no image found: the ground-truth foreground in dark grey
        ax.imshow(gt > 0, cmap="gray", vmin=0, vmax=3, aspect=spacing[0] / spacing[1])
        title += " (no image)"
    else:
        shown = background.astype(float)
        lo, hi = np.percentile(shown, (0.5, 99.5))
        shown = np.clip((shown - lo) / max(hi - lo, 1e-6), 0, 1)
        ax.imshow(shown, cmap="gray", aspect=spacing[0] / spacing[1])
    from matplotlib.lines import Line2D

    colours = ["tab:green", "tab:red", "tab:orange", "tab:cyan", "tab:purple", "tab:olive"]
    handles = []
    for i, (value, name) in enumerate(evaluation.labels.items()):
        colour = colours[i % len(colours)]
        handles.append(Line2D([], [], color=colour, label=f"{value}: {name}"))
        for mask, style in ((gt == value, "solid"), (pred == value, "dashed")):
            if mask.any() and not mask.all():
                ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linestyles=style, linewidths=1.2)
    handles.append(Line2D([], [], color="black", label="ground truth"))
    handles.append(Line2D([], [], color="black", linestyle="dashed", label="prediction"))
    ax.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.7)
    ax.set_title(title + "\nsolid: ground truth, dashed: prediction", fontsize=9)
    ax.axis("off")
