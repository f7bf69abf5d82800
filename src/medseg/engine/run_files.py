"""Files a training run writes: atomically (temporary file in the same folder, then rename), so that a
crash or ``kill -9`` never leaves a half-written checkpoint, record or picture."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Call ``write(binary_file)`` on a temporary file beside ``path``, then rename it to ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the permissions any new file gets
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


def plot_curve(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Training loss (left axis) and validation mean Dice (right axis, ``val_mean_dice``) per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, left = plt.subplots(figsize=(6, 3.5), dpi=100)
    left.plot(epochs, [r["loss"] for r in history], color="tab:red", marker=".", label="training loss")
    left.set_xlabel("epoch")
    left.set_ylabel("training loss", color="tab:red")
    right = left.twinx()
    dice_values = [r.get("val_mean_dice") for r in history]
    right.plot(epochs, [np.nan if d is None else d for d in dice_values], color="tab:blue", marker=".")
    right.set_ylabel("validation mean Dice", color="tab:blue")
    right.set_ylim(0, 1)
    left.set_title(title)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
