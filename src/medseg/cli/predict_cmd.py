"""``medseg predict MODEL_DIR INPUTS -o OUT``: segment a file, a folder, a glob or a list of paths with a trained
supervised model; all or nothing by default, case by case with a manifest (``--batch``), on Ray (``--ray``)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from medseg.cli.batch_options import BATCH, RAY, RAY_ADDRESS, WORKERS, batch_mode, run_batch_command
from medseg.cli.common import OUTPUT_FORMAT_HELP, out, progress_bar, user_errors
from medseg.errors import MedsegError


@user_errors
def predict(
    model_dir: Path = typer.Argument(..., help="Folder written by 'medseg train'."),
    input_path: Path = typer.Argument(
        ...,
        metavar="INPUTS",
        help="An image, a DICOM series folder, a folder, a glob ('scans/*.nii.gz', quoted) or a .txt/.csv list.",
    ),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder (label maps named by case)."),
    mirror: bool = typer.Option(False, "--mirror", help="Mirroring test-time augmentation (2^n passes)."),
    save_probabilities: bool = typer.Option(False, "--save-probabilities", help="Also write probabilities/<case>.npz."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or mps."),
    output_format: str = typer.Option("auto", "--output-format", help=OUTPUT_FORMAT_HELP),
    series: str | None = typer.Option(
        None, "--series", help="Of a DICOM folder holding several series: its SeriesNumber or SeriesInstanceUID."
    ),
    frame: int | None = typer.Option(None, "--frame", help="Of a 4D input (time series, cine): the volume to use."),
    batch: bool = BATCH,
    use_ray: bool = RAY,
    ray_address: str | None = RAY_ADDRESS,
    workers: int | None = WORKERS,
) -> None:
    """Segment a file or a folder with a model from 'medseg train'.

    Label maps in each input's geometry and format (NIfTI for DICOM/MRC input, PNG for JPEG; --output-format
    dicom-seg: a DICOM-SEG per DICOM series, segments named by the model's labels); a folder's files are
    grouped into cases by their _0000, _0001 channel suffixes.

    --batch and --ray write each case when it is done and record it in OUT/manifest.csv (path, output, status,
    seconds, error, model); a case that fails is a row, the run goes on; a second run skips the cases done with
    the same model. Exit status: 0 every case done, 1 some failed (counted on stderr), 2 nothing done (an error
    in the command, the model or OUT)."""
    from medseg.data.cases import load_channels
    from medseg.inference.engines import SpecialistEngine
    from medseg.inference.folders import cases_of, label_targets, predict_folder
    from medseg.inference.run_lock import check_unlocked
    from medseg.io.formats import check_output_format
    from medseg.io.paths import check_output

    check_output_format(output_format)
    check_output(output)
    if save_probabilities and (output / "probabilities").exists() and not (output / "probabilities").is_dir():
        raise MedsegError("is a file; --save-probabilities writes a folder there", output / "probabilities")
    cases = cases_of(input_path, skip=output)  # OUT inside INPUTS: its label maps are not inputs
    batch, use_ray = batch_mode(batch, use_ray, ray_address, workers)
    if batch:
        from medseg.engine.batch_runners import SpecialistRunner

        runner = SpecialistRunner(str(model_dir), device, mirror, save_probabilities, output_format, series, frame)
        run_batch_command(runner, cases, output, use_ray, ray_address, workers)
        return
    if output_format != "auto":  # a non-DICOM input for dicom-seg is refused before the model loads
        label_targets(cases, output, output_format=output_format)
    check_unlocked(output)  # a batch run writing into OUT: refused before the model loads
    engine = SpecialistEngine.from_pretrained(model_dir, device)
    names = {value: name for name, value in engine.predictor.plan.labels.items() if value != 0}
    started = time.perf_counter()
    with progress_bar("predicting", len(cases)) as advance:
        predict_folder(
            lambda image: engine.predict(image, probabilities=save_probabilities, mirror=mirror),
            cases,
            output,
            load_case=lambda files: load_channels(files, series=series, frame=frame),
            check=engine.check,
            save_probabilities=save_probabilities,
            on_case=advance,
            output_format=output_format,
            segment_names=names,
            algorithm_name=f"medseg specialist ({engine.predictor.plan.network.name})",
        )
    seconds = time.perf_counter() - started
    out.print(f"{len(cases)} label map(s) in {output} ({seconds / max(len(cases), 1):.2f} s per case)", soft_wrap=True)
