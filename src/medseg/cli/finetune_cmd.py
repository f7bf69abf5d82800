"""``medseg finetune-prompt DATASET -o MODEL_DIR``: adapt the promptable model's decoder to your data."""

from __future__ import annotations

from pathlib import Path

import typer

from medseg.cli.common import cpu_only, out, user_errors


@user_errors
def finetune_prompt(
    datasets: list[Path] = typer.Argument(
        ..., metavar="DATASET...", help="Labelled dataset(s) (nnU-Net layout or images/ + masks/); several are pooled."
    ),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for the fine-tuned weights and finetune.json."),
    epochs: int = typer.Option(20, min=1, help="Training epochs over the objects of the training split."),
    minutes: float | None = typer.Option(None, min=0.0, help="Stop after the epoch that crosses this budget."),
    lr: float = typer.Option(1e-4, min=0.0, help="AdamW learning rate."),
    batch_size: int = typer.Option(8, min=1, help="Objects per step."),
    box_jitter: float = typer.Option(0.1, min=0.0, max=1.0, help="Box sides move by up to this fraction of the box."),
    max_cases: int | None = typer.Option(None, min=2, help="Use this many cases (seeded draw); default all."),
    val_fraction: float = typer.Option(0.2, min=0.0, max=0.9, help="Fraction of cases held out for validation."),
    seed: int = typer.Option(0, help="Seed for the split, box jitter and order."),
    train_encoder: bool = typer.Option(False, "--train-encoder", help="Also train the image encoder (slow on CPU)."),
    clicks: int = typer.Option(
        0, min=0, max=20, help="Also train interactive clicks, up to this many per object (and the prompt encoder)."
    ),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="Start from these weights (default LiteMedSAM)."),
    model: str | None = typer.Option(
        None, "--model", help="lite_medsam, medsam_vit_b or sam_vit_b (default: guessed)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run saved in the output folder."),
    device: str = typer.Option("cpu", "--device", help="cpu (cuda and mps: not yet, this trainer runs on the CPU)."),
) -> None:
    """Fine-tune the mask decoder with boxes simulated from the labels (MedSAM's recipe); the encoder's
    embeddings are computed once and cached, so this runs on a CPU."""
    from rich.table import Table

    from medseg.engine.finetune_prompt import FinetuneConfig, finetune
    from medseg.io.paths import check_output

    cpu_only(device, "finetune-prompt")
    check_output(output)
    config = FinetuneConfig(
        epochs=epochs, minutes=minutes, lr=lr, batch_size=batch_size, box_jitter=box_jitter,
        val_fraction=val_fraction, seed=seed, max_cases=max_cases, train_encoder=train_encoder, clicks=clicks,
    )  # fmt: skip

    def report(entry: dict[str, float]) -> None:
        out.print(f"epoch {int(entry['epoch'])}: loss {entry['loss']:.4f}, validation Dice {entry['val_dice']:.4f}")

    result = finetune(
        datasets if len(datasets) > 1 else datasets[0], output, config, checkpoint, model, resume, on_epoch=report
    )
    table = Table(title=f"validation Dice ({result.epochs_run} epochs, {result.seconds / 60:.1f} min)")
    for column in ("label", "before", "after"):
        table.add_column(column, justify="right")
    for label, before in result.val_dice_before.items():
        table.add_row(str(label), f"{before:.4f}", f"{result.val_dice_after.get(label, float('nan')):.4f}")
    out.print(table)
    out.print(f"wrote {result.checkpoint_path} (use: medseg prompt ... --checkpoint {result.checkpoint_path})")
