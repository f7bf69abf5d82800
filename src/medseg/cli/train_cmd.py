"""``medseg train DATASET --model unet|vnet|transunet -o MODEL_DIR``: a supervised specialist model."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer

from medseg.cli.common import check_device, err, out, user_errors
from medseg.errors import MedsegError


@user_errors
def train(
    dataset: Path = typer.Argument(..., help="Dataset folder (nnU-Net raw layout, or images/ + masks/)."),
    output: Path = typer.Option(..., "-o", "--output", help="Model folder (plan, split, checkpoints, curve)."),
    model: str | None = typer.Option(None, "--model", help="unet, vnet or transunet (default: the plan's, else unet)."),
    plan_file: Path | None = typer.Option(None, "--plan", help="plan.json from 'medseg plan' (default: plan now)."),
    fold: int = typer.Option(0, "--fold", help="Validation fold of the k-fold split."),
    folds: int = typer.Option(5, "--folds", help="Number of folds."),
    val_cases: Path | None = typer.Option(None, "--val-cases", help="Text file: validation case names, one a line."),
    num_labelled: int | None = typer.Option(None, "--num-labelled", help="Train on N cases drawn with the seed."),
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs (default: the plan's)."),
    minutes: float | None = typer.Option(
        None, "--minutes", help="Training-time budget in minutes, counting earlier runs of a resumed run."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for the split, patches and augmentation."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in MODEL_DIR from its last checkpoint."),
    memory_gb: float | None = typer.Option(None, "--memory-gb", help="Memory budget (default: half the RAM)."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when there is one, else cpu), cpu, cuda or mps."),
    genseg: bool = typer.Option(
        False, "--genseg", help="GenSeg: add pairs a generator makes from masks (few labels: with --num-labelled N)."
    ),
    genseg_mode: str | None = typer.Option(
        None, "--genseg-mode", help="With --genseg: end-to-end (default) or separate (generator first, then frozen)."
    ),
    backbone: str = typer.Option(
        "plain", "--backbone", help="plain, or litemedsam (LiteMedSAM's pretrained encoder, 2D)."
    ),
    fine_tune_encoder: bool = typer.Option(
        False, "--fine-tune-encoder/--freeze-encoder", help="litemedsam: train the pretrained encoder too."
    ),
    predict_validation: bool = typer.Option(
        True,
        "--predict-validation/--no-predict-validation",
        help="Segment the validation cases into MODEL_DIR/validation.",
    ),
) -> None:
    """Train a U-Net, V-Net or TransUNet, planned from the data; works under torchrun (one shard per process).

    Few labels: --num-labelled N --genseg adds GenSeg's generated image-mask pairs (its grid of pairs:
    MODEL_DIR/genseg_pairs.png); --backbone litemedsam starts the U-Net's encoder from LiteMedSAM's weights.

    Every epoch writes checkpoint.pt and model.pt atomically; --resume continues after a crash. At the end
    the validation cases are segmented into MODEL_DIR/validation (score them with 'medseg evaluate').
    """
    from medseg.engine.supervised import TrainOptions
    from medseg.engine.supervised import train as run_training
    from medseg.io.paths import check_output
    from medseg.planning import read_plan

    check_device(device, allow_auto=True)
    if genseg_mode is not None and not genseg:
        raise MedsegError("--genseg-mode is for a GenSeg run: add --genseg")
    if genseg_mode not in (None, "end-to-end", "separate"):
        raise MedsegError(f"--genseg-mode must be end-to-end or separate, got {genseg_mode!r}")
    check_output(output)
    names = None
    if val_cases is not None:
        if val_cases.is_dir():
            raise MedsegError("is a folder; --val-cases takes a text file with one case name a line", val_cases)
        if not val_cases.is_file():
            raise MedsegError("no such file", val_cases)
        try:
            names = [line.strip() for line in val_cases.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise MedsegError("not a text file (one case name a line)", val_cases) from None
    options = TrainOptions(
        dataset=dataset,
        output=output,
        model=model,
        plan=read_plan(plan_file) if plan_file is not None else None,
        fold=fold,
        folds=folds,
        val_cases=names,
        num_labelled=num_labelled,
        epochs=epochs,
        minutes=minutes,
        seed=seed,
        resume=resume,
        memory_gb=memory_gb,
        device=device,
        backbone=backbone,
        fine_tune_encoder=fine_tune_encoder,
        genseg=(genseg_mode or "end-to-end") if genseg else None,
    )
    with _Display() as display:
        result = run_training(options, on_iteration=display.iteration, on_epoch=display.epoch)
    if display.main:
        out.print(
            f"trained {result.epochs} epochs (batch {result.batch_size}) in {result.training_seconds / 60:.1f} min "
            f"({result.images_per_second:.1f} patches/s); validation Dice {result.val_dice}",
            soft_wrap=True,
        )
        if predict_validation:
            folder = _predict_validation(result.model_dir, dataset, device)
            out.print(
                f"validation cases segmented into {folder} (medseg evaluate {folder} GT_FOLDER -o DIR)", soft_wrap=True
            )
        out.print(f"model in {result.model_dir} (medseg predict {result.model_dir} INPUT -o OUT)", soft_wrap=True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _leave_distributed()


def _leave_distributed() -> None:
    """End a torchrun rank whose work is written and whose process group is destroyed, skipping the C++
    teardown: gloo's threads can abort a process at interpreter exit ("terminate called without an active
    exception", SIGABRT; pytorch/pytorch#179291), which torchrun reports as a failed run."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _predict_validation(model_dir: Path, dataset: Path, device: str) -> Path:
    """nnU-Net's habit: the fold's validation cases segmented by the final model, from their own files."""
    import json

    from medseg.cli.common import progress_bar
    from medseg.data import open_dataset
    from medseg.data.cases import load_channels
    from medseg.inference.supervised_predictor import SupervisedPredictor
    from medseg.io import label_path_for, save

    predictor = SupervisedPredictor(model_dir, "cpu" if device == "auto" else device)
    names = set(json.loads((model_dir / "split.json").read_text())["val"])
    cases = [c for c in open_dataset(dataset).cases if c.name in names]
    folder = model_dir / "validation"
    with progress_bar("validation", len(cases)) as advance:
        for case in cases:
            image = load_channels(case.images)
            prediction = predictor.predict(image)
            save(image.with_array(prediction.labels), label_path_for(case.images[0], folder, case.name))
            advance()
    return folder


class _Display:
    """A progress bar with loss and validation Dice on a terminal; one line per epoch otherwise."""

    def __init__(self) -> None:
        self.main = os.environ.get("RANK", "0") == "0"
        self.live = self.main and sys.stderr.isatty()
        self.progress: Any = None
        self.task: Any = None
        self.last_dice = "-"

    def __enter__(self) -> _Display:
        if self.live:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=err)
            self.progress.start()
            self.task = self.progress.add_task("training", total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def iteration(self, epoch: int, iteration: int, loss: float) -> None:
        if self.progress is not None:
            self.progress.update(
                self.task, description=f"epoch {epoch + 1} it {iteration + 1} loss {loss:.3f} val Dice {self.last_dice}"
            )

    def epoch(self, record: dict[str, Any]) -> None:
        mean = record.get("val_mean_dice")
        self.last_dice = "-" if mean is None else f"{mean:.3f}"
        line = (
            f"epoch {record['epoch']}: loss {record['loss']:.4f}, validation Dice {record.get('val_dice')} "
            f"({record['seconds']:.0f} s)"
        )
        if self.progress is not None:
            self.progress.console.print(line, markup=False)
        elif self.main:
            err.print(line, markup=False, soft_wrap=True)
