#!/usr/bin/env bash
# Reproduce src/medseg/models/promptable/weights/lite_medsam_interactive_head.pt: LiteMedSAM's prompt
# encoder and mask decoder fine-tuned for clicks (and boxes) on three datasets of ../shared/data; the
# image encoder stays LiteMedSAM's. WBC, ISBI-EM, DRIVE, MoNuSeg and Hippocampus are held out, so
# benchmarks/prompt.py can report clicks on data the head never saw. About 30 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS="${EPOCHS:-40}"
MINUTES="${MINUTES:-28}"
medseg finetune-prompt ../shared/data/JSRT ../shared/data/Kvasir-SEG ../shared/data/BUSI \
    --max-cases 50 --clicks 4 --epochs "$EPOCHS" --minutes "$MINUTES" --seed 0 -o runs/interactive
python -c "
from pathlib import Path
from medseg.models.promptable.registry import INTERACTIVE_HEAD, export_head
print('wrote', export_head(Path('runs/interactive/lite_medsam_finetuned.pth'), INTERACTIVE_HEAD))
"
