"""``medseg prompt INPUT --box ... | --box3d ... | --point ... -o OUT``: a mask from a box or clicks; ``medseg prompt
INPUTS --boxes boxes.csv -o OUT --batch | --ray``: many images, each with its own boxes, case by case."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from medseg.cli.batch_options import BATCH, RAY, RAY_ADDRESS, WORKERS, batch_mode, run_batch_command
from medseg.cli.common import OUTPUT_FORMAT_HELP, check_device, out, progress_bar, user_errors
from medseg.cli.common import err as stderr
from medseg.errors import MedsegError

if TYPE_CHECKING:
    import numpy as np

    from medseg.engine.batch_runners import PromptRunner


@user_errors
def prompt(
    input_path: Path = typer.Argument(
        ...,
        metavar="INPUT",
        help="2D image or volume (any format medseg reads); with --boxes: a folder, a glob or a .txt/.csv list.",
    ),
    output: Path = typer.Option(..., "-o", "--output", help="Label map file (e.g. out.nii.gz), or a folder."),
    box: list[str] = typer.Option([], "--box", help="x0,y0,x1,y1 in pixels (x = column); repeat for more objects."),
    box3d: list[str] = typer.Option([], "--box3d", help="x0,y0,z0,x1,y1,z1 voxel indices (z inclusive); repeatable."),
    planes: int = typer.Option(
        1,
        "--planes",
        help="3D boxes: 1 propagates slice by slice along z; 3 votes over the slices along all three axes "
        "(about 2x the time; voxels of similar size along the axes).",
    ),
    point: list[str] = typer.Option([], "--point", help="x,y[,label]: a click, label 1 (default) or 0 (negative)."),
    slice_index: int | None = typer.Option(None, "--slice", help="Slice (array axis 0) of a volume for --box/--point."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="SAM-family weights (default: LiteMedSAM)."),
    model: str | None = typer.Option(
        None,
        "--model",
        help="lite_medsam, medsam_vit_b, sam_vit_b or lite_medsam_interactive (medseg's click head; "
        "default: guessed, and the click head for clicks without a box).",
    ),
    preset: str | None = typer.Option(None, "--preset", help="Intensity preset, e.g. ct:soft_tissue, ct:lung, mr."),
    device: str = typer.Option("cpu", "--device", help="Where the model runs: cpu, cuda or mps."),
    output_format: str = typer.Option("auto", "--output-format", help=OUTPUT_FORMAT_HELP),
    series: str | None = typer.Option(
        None, "--series", help="Of a DICOM folder holding several series: its SeriesNumber or SeriesInstanceUID."
    ),
    frame: int | None = typer.Option(None, "--frame", help="Of a 4D input (time series, cine): the volume to use."),
    boxes: Path | None = typer.Option(
        None,
        "--boxes",
        help="A CSV of boxes per image: path,x0,y0,x1,y1 (optional z0,z1: a 3D box; slice: a 2D box's slice of a "
        "volume); a path's rows are its objects 1, 2, ... Case by case into the folder -o (implies --batch).",
    ),
    batch: bool = BATCH,
    use_ray: bool = RAY,
    ray_address: str | None = RAY_ADDRESS,
    workers: int | None = WORKERS,
) -> None:
    """Segment objects from prompts with a MedSAM-family model; the label map keeps the input's geometry.

    Each box (or 3D box) is one object, labelled 1, 2, ... in order; clicks refine one object. On a
    volume, objects are propagated slice by slice from the middle of a 3D box, or from --slice. A DICOM
    series in, -o x.dcm or --output-format dicom-seg: a DICOM-SEG (SEMIAUTOMATIC) referencing the series.

    --boxes boxes.csv (with --batch, implied, or --ray): every image of INPUTS with its rows' boxes, case by case
    into the folder -o with OUT/manifest.csv, as 'medseg predict --help' says; an image without a row, or a row
    naming a missing file, is a failed row.
    """
    from medseg.inference.prompt_predictor import PromptPredictor
    from medseg.inference.prompt_session import Prompts, clip_to_image, intensity_preset, segment, validate
    from medseg.inference.propagation import embedded_slices
    from medseg.io import case_of, format_of, label_path_for, load, save, save_dicom_seg
    from medseg.io.dicom_source import check_grid, read_source
    from medseg.io.formats import check_label_target, check_output_format
    from medseg.io.paths import check_output
    from medseg.models.promptable.registry import has_interactive_head
    from medseg.preprocessing import check_preset_fits

    check_output_format(output_format)
    check_device(device)
    if planes not in (1, 3):
        raise MedsegError(f"--planes must be 1 or 3, not {planes}")
    if planes == 3 and boxes is None and not box3d:
        raise MedsegError("--planes 3 is for --box3d (a 2D --box or clicks propagate from their slice)")
    batch, use_ray = batch_mode(batch, use_ray, ray_address, workers)
    if boxes is not None or batch:
        if boxes is None:
            raise MedsegError("--batch and --ray take the boxes of each image from --boxes boxes.csv")
        if box or box3d or point or slice_index is not None:
            raise MedsegError("--boxes gives each image its boxes: leave out --box, --box3d, --point and --slice")
        from medseg.engine.batch_runners import PromptRunner

        runner = PromptRunner(str(boxes), {}, None if checkpoint is None else str(checkpoint), model, preset, device,
                              output_format, series, frame, planes)  # fmt: skip
        _prompt_batch(runner, input_path, output, (use_ray, ray_address, workers))
        return
    prompts = Prompts(
        boxes=[_numbers(b, 4, "--box") for b in box],  # type: ignore[misc]
        boxes3d=[_numbers(b, 6, "--box3d") for b in box3d],  # type: ignore[misc]
        slice_index=slice_index,
        planes=planes,
    )
    for text in point:
        values = _numbers(text, None, "--point")
        if len(values) not in (2, 3) or (len(values) == 3 and values[2] not in (0, 1)):
            raise MedsegError(f"--point '{text}' must be x,y or x,y,label with label 1 or 0")
        prompts.points.append((values[0], values[1]))
        prompts.point_labels.append(int(values[2]) if len(values) == 3 else 1)
    if output.suffix:
        target = output
        check_output_format(output_format, target, input_path)
    elif output.is_file():  # e.g. a DICOM slice without extension: not a folder to write into
        raise MedsegError("is a file without an extension: give a label map file (e.g. out.nii.gz) or a folder", output)
    else:
        target = label_path_for(input_path, output, case_of(input_path), output_format)
    check_output(target, folder=False)
    if input_path.is_dir() and target.resolve().is_relative_to(input_path.resolve()):
        raise MedsegError("refusing to write into the input DICOM series folder: choose another output", target)
    dicom_seg = format_of(target) == "dicom"  # an unknown output extension fails before any work
    image = load(input_path, series=series, frame=frame)
    check_label_target(target, image.ndim)  # a volume's labels as .png: refused now, not after the work
    prompts, notes = clip_to_image(image, prompts)
    for note in notes:  # a box dragged past the edge means the part inside
        stderr.print(f"medseg: note: {note}", soft_wrap=True)
    try:
        validate(image, prompts)
        check_preset_fits(image, intensity_preset(image, preset))  # a CT window on an 8-bit image: no HU there
    except MedsegError as err:
        raise MedsegError(err.problem, input_path) from None
    if dicom_seg:  # the series' headers and grid, before any work
        check_grid(image, read_source(input_path), input_path)
    started = time.perf_counter()
    clicks_only = prompts.points and not (prompts.boxes or prompts.boxes3d)
    if clicks_only and checkpoint is None and model is None and has_interactive_head():
        model = "lite_medsam_interactive"  # LiteMedSAM itself was trained with boxes only
        out.print("clicks without a box: using LiteMedSAM with medseg's click-trained head (lite_medsam_interactive)")
    predictor = PromptPredictor.from_checkpoint(checkpoint, model, device=device)
    depth = image.shape[0] if image.ndim == 3 else 1
    # the slices each 3D box covers; a 2D box or clicks on a volume may reach every slice
    planned = sum(embedded_slices(b, planes) for b in prompts.boxes3d)
    planned += depth * (len(prompts.boxes) or int(bool(prompts.points))) if image.ndim == 3 else 1
    try:
        with progress_bar("segmenting slices", max(planned, 1)) as advance:
            labels = segment(predictor, image, prompts, preset, on_slice=advance)
    except MedsegError as err:  # the image's problems (too small, ...) name the image
        raise MedsegError(err.problem, err.path or input_path) from None
    if dicom_seg:
        name = f"medseg prompt ({predictor.spec.name})"
        written = save_dicom_seg(labels, target, input_path, algorithm_type="SEMIAUTOMATIC", algorithm_name=name)
    else:
        written = save(labels, target, protect=(input_path,))
    _report(labels.array, image.voxel_volume_mm3, image.ndim, written, time.perf_counter() - started)


def _prompt_batch(runner: PromptRunner, inputs: Path, output: Path, ray: tuple[bool, str | None, int | None]) -> None:
    """``runner`` on the cases of ``inputs`` with their boxes from ``runner.boxes_file``."""
    from dataclasses import replace

    from medseg.inference.box_table import boxes_of_cases
    from medseg.inference.folders import cases_of
    from medseg.io.paths import check_output

    if output.suffix and not output.is_dir():
        raise MedsegError("with --boxes, -o is a folder (label maps named by case)", output)
    check_output(output)
    cases, boxes = boxes_of_cases(cases_of(inputs, skip=output), Path(runner.boxes_file))
    run_batch_command(replace(runner, boxes=boxes), cases, output, *ray, description="segmenting")


def _numbers(text: str, count: int | None, option: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise MedsegError(f"{option} '{text}' must be comma-separated numbers") from None
    for value in values:  # float() reads 'nan' and 'inf'
        if not math.isfinite(value):
            raise MedsegError(f"{option} '{text}': {value:g} is not a finite number")
    if count is not None and len(values) != count:
        raise MedsegError(f"{option} '{text}' needs {count} numbers, got {len(values)}")
    return values


def _report(labels: np.ndarray, voxel_mm3: float, ndim: int, written: Path, seconds: float) -> None:
    import numpy as np

    values, counts = np.unique(labels[labels > 0], return_counts=True)
    unit, element = ("ml", "voxels") if ndim == 3 else ("mm^2", "pixels")
    scale = voxel_mm3 / 1000 if ndim == 3 else voxel_mm3
    found = ", ".join(f"label {v}: {c} {element} ({c * scale:.6g} {unit})" for v, c in zip(values, counts, strict=True))
    out.print(f"{found or 'nothing found (empty mask)'}; {seconds:.1f} s")
    out.print(f"wrote {written}")
