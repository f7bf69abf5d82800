"""Peak memory of a LiteMedSAM U-Net's training step, frozen or fine-tuned encoder, plain or GenSeg's.

These are the figures `medseg.planning` (`litemedsam_step_gb`) uses to fit the batch of a ``--backbone
litemedsam`` run to the memory budget. Each row is a fresh process (its own ``VmHWM``): two steps of the U-Net on
random RGB patches, the encoder frozen (the default) or fine-tuned (``--fine-tune-encoder``); ``ordinary`` is a
plain step (forward, backward, Adam) on a batch of images, ``architecture`` is GenSeg's architecture step
(`hypergradient`: one unrolled step differentiated through, on images that depend on an architecture weight,
then the validation loss on as many real ones). The per-image figure is the slope between batch 1 and the
larger batch (4 for ordinary steps, 2 for architecture steps: a fine-tuned one at 3 would need over 20 GB), the
fixed part what is left at batch 1 beyond the process itself (imports and weights).

    python benchmarks/litemedsam_memory.py [--side 256]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from rich.console import Console
from rich.table import Table

STEP = r"""
import sys, torch
import torch.nn.functional as F
from medseg.engine.supervised.genseg import hypergradient
from medseg.models.supervised.litemedsam_unet import LiteMedSAMUNet
encoder, kind, batch, side = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
def peak():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1e6
network = LiteMedSAMUNet(3, 2, freeze_encoder=encoder == "frozen").train()
trainable = [p for p in network.parameters() if p.requires_grad]
optimiser = torch.optim.Adam(trainable, 1e-3)
before = peak()
alpha = torch.ones(1, requires_grad=True)
for _ in range(2):
    images, labels = torch.rand(batch, 3, side, side), torch.randint(0, 2, (batch, side, side))
    if kind == "ordinary":
        loss = F.cross_entropy(network(images), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    else:
        hypergradient(network, F.cross_entropy, images * alpha, labels, images, labels, 0.01, [alpha])
print(before, peak())
"""


def measure(encoder: str, kind: str, batch: int, side: int) -> tuple[float, float]:
    """(GB before the first step, peak GB) of one child process."""
    done = subprocess.run(
        [sys.executable, "-c", STEP, encoder, kind, str(batch), str(side)], capture_output=True, text=True, check=True
    )
    before, peak = (float(v) for v in done.stdout.split())
    return before, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=256, help="patch side in pixels (default 256)")
    args = parser.parse_args()
    table = Table(title=f"LiteMedSAM U-Net training step, {args.side} x {args.side} patches: peak GB")
    for column in ("encoder", "step", "process", "batch 1", "larger batch", "GB per image", "fixed GB"):
        table.add_column(column)
    for encoder in ("frozen", "fine-tuned"):
        for kind, larger in (("ordinary", 4), ("architecture", 2)):
            base, one = measure(encoder, kind, 1, args.side)
            _, more = measure(encoder, kind, larger, args.side)
            per_image = (more - one) / (larger - 1)
            fixed = one - base - per_image
            row = [f"{base:.2f}", f"{one:.2f}", f"{more:.2f} ({larger})", f"{per_image:.2f}", f"{fixed:.2f}"]
            table.add_row(encoder, kind, *row)
    Console().print(table)


if __name__ == "__main__":
    main()
