"""``medseg plan DATASET -o PLAN_DIR``: fingerprint a dataset and write an editable ``plan.json``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from medseg.cli.common import out, progress_bar, user_errors
from medseg.errors import MedsegError


@user_errors
def plan(
    dataset: Path = typer.Argument(..., help="Dataset folder (nnU-Net raw layout, or images/ + masks/)."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for plan.json and fingerprint.json."),
    model: str = typer.Option("unet", "--model", help="unet, vnet or transunet."),
    memory_gb: float | None = typer.Option(None, "--memory-gb", help="Training memory budget (default: half the RAM)."),
    profile: str | None = typer.Option(None, "--profile", help="cpu or gpu (default: gpu when CUDA is available)."),
) -> None:
    """Choose spacing, patch, batch size, normalisation and network depth from the data (nnU-Net's rules)."""
    from medseg.data import open_dataset
    from medseg.data.check import require_valid
    from medseg.io.paths import check_output, link_problem
    from medseg.planning import fingerprint_dataset, make_plan, write_plan

    if output.exists() and not output.is_dir():
        raise MedsegError("is a file; -o needs a folder", output)
    check_output(output)
    if link_problem(dataset):  # named before resolve() below trips over it
        raise MedsegError(str(link_problem(dataset)), dataset)
    if output.resolve() == dataset.resolve() or dataset.resolve() in output.resolve().parents:
        raise MedsegError("the plan folder must not be inside the dataset", output)
    data = open_dataset(dataset)
    require_valid(data)
    with progress_bar("fingerprint", len(data.cases)) as advance:
        fingerprint = fingerprint_dataset(data, on_case=advance)
    made = make_plan(fingerprint, model, memory_gb, profile)
    output.mkdir(parents=True, exist_ok=True)
    (output / "fingerprint.json").write_text(json.dumps(fingerprint.to_dict()) + "\n")
    path = write_plan(made, output / "plan.json")
    out.print(summary(made), soft_wrap=True)
    out.print(f"wrote {path} (edit it, then: medseg train {dataset} --plan {path} -o MODEL_DIR)", soft_wrap=True)


def summary(made: object) -> str:
    """A few lines a user reads before training."""
    from medseg.planning import Plan

    assert isinstance(made, Plan)
    lines = [
        f"dataset      {made.dataset_name} ({made.modality or 'modality not declared'}), {made.spatial_dims}D, "
        f"{made.channels} channel(s), labels {made.labels}",
        f"spacing      {made.target_spacing} mm (median shape {made.median_shape})",
        f"network      {made.network.name}, {len(made.network.strides)} down-sampling steps, features "
        f"{made.network.features()}",
        f"patch        {made.patch_size}, batch {made.training.batch_size} "
        f"(~{made.estimated_memory_gb:.1f} GB of a {made.memory_budget_gb:.1f} GB budget, {made.profile} profile)",
        f"intensity    {made.intensity['name']}; mirror axes {made.mirror_axes}",
    ]
    return "\n".join(lines)
