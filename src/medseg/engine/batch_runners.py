"""The engines' parts in a batch run (`medseg.engine.batch.CaseRunner`): what ``--batch`` and ``--ray`` of
``medseg predict``, ``medseg incontext`` and ``medseg prompt`` run per case.

Each runner is plain values (they travel to Ray's workers); `build` makes the predictor once per worker and
segments a case as the all-or-nothing command does, so the label maps are the same bytes. Its `model` hash
covers what changes the outputs: weights (their bytes), options, the support set's files, a case's boxes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from medseg.engine.batch import CasePredictor, CaseRunner, absolute_paths
from medseg.engine.manifest import content_hash, model_hash
from medseg.errors import MedsegError

if TYPE_CHECKING:
    from medseg.inference.box_table import CaseBoxes
    from medseg.inference.engines import Segmentation
    from medseg.io import Image


@dataclass(frozen=True)
class SpecialistRunner(CaseRunner):
    """``medseg predict``: a model folder of ``medseg train`` and the options of the command."""

    model_dir: str
    device: str = "cpu"
    mirror: bool = False
    save_probabilities: bool = False
    output_format: str = "auto"
    series: str | None = None  # of DICOM folders holding several series (`medseg.io.load`)
    frame: int | None = None  # of 4D inputs

    def absolute(self) -> CaseRunner:
        return absolute_paths(self, "model_dir")

    def model(self) -> str:
        """`model_hash` of the weights, the plan and the options that change what is written."""
        chosen = {k: v for k, v in (("series", self.series), ("frame", self.frame)) if v is not None}
        return model_hash(
            Path(self.model_dir),
            mirror=self.mirror,
            save_probabilities=self.save_probabilities,
            output_format=self.output_format,
            **chosen,  # only when given: a run without them keeps the hash it had
        )

    def build(self) -> CasePredictor:
        from medseg.data.cases import load_channels
        from medseg.inference.engines import SpecialistEngine

        engine = SpecialistEngine.from_pretrained(self.model_dir, self.device)
        plan = engine.predictor.plan

        def segment(case: str, image: Image) -> Segmentation:
            engine.check(image)
            return engine.predict(image, probabilities=self.save_probabilities, mirror=self.mirror)

        return CasePredictor(
            load=lambda files: load_channels(files, series=self.series, frame=self.frame),
            segment=segment,
            segment_names={value: name for name, value in plan.labels.items() if value != 0},
            algorithm_name=f"medseg specialist ({plan.network.name})",
            probabilities=self.save_probabilities,
        )


@dataclass(frozen=True)
class InContextRunner(CaseRunner):
    """``medseg incontext``: a support folder, the engine and its weights, and the options of the command. Each
    worker builds the predictor and reads the support set once; the engine's fits to the supports are made at
    its first query and kept for the others."""

    support: str
    engine: str | None = None
    weights: str | None = None
    checkpoint: str | None = None
    head: str | None = None
    frame_size: int | None = None
    device: str = "cpu"
    ensemble: int = 1
    subset_size: int | None = None
    neighbours: int = 1
    slice_bins: int | None = None  # None: the engine's default; 0: each slice on its own
    largest_component: bool = True
    decoder: str | None = None  # None: the engine's default (`build_segmenter`)
    output_format: str = "auto"

    def absolute(self) -> CaseRunner:
        return absolute_paths(self, "support", "weights", "checkpoint", "head")

    def protect(self) -> list[Path]:
        from medseg.inference.incontext_inputs import support_files

        return support_files(Path(self.support))

    def model(self) -> str:
        """`content_hash` of the weights, the support set's files and the options that change the outputs."""
        from medseg.inference.incontext_inputs import decoder_mode, engine_name, weight_files

        name = engine_name(self.engine, self.weights, self.head)
        files = weight_files(self.engine, self.weights, self.checkpoint, self.head) + self.protect()
        decoder = decoder_mode(self.decoder, name)
        if decoder != "off" and name == "universeg":  # the decoder's LiteMedSAM weights make the outputs too
            files += weight_files("probe", None, self.checkpoint, None)
        return content_hash(
            files,
            engine=name,
            frame_size=self.frame_size,
            ensemble=self.ensemble,
            subset_size=self.subset_size,
            neighbours=self.neighbours,
            slice_bins=self.slice_bins,
            largest_component=self.largest_component,
            decoder=decoder,
            output_format=self.output_format,
        )

    def build(self) -> CasePredictor:
        from medseg.inference.incontext_inputs import build_predictor, build_segmenter, load_support
        from medseg.inference.incontext_predictor import bins_option
        from medseg.io import load

        predictor, name = build_predictor(
            self.engine, self.weights, self.checkpoint, self.head, self.frame_size, self.device, self.slice_bins
        )
        supports = load_support(Path(self.support), self.subset_size)
        segmenter = build_segmenter(predictor, name, self.decoder, self.checkpoint, self.device)
        segmenter.set_support(supports.images, supports.labels)

        def segment(case: str, image: Image) -> Segmentation:
            supports.check_query(image)
            return segmenter.predict(
                image,
                ensemble=self.ensemble,
                subset_size=self.subset_size,
                neighbours=self.neighbours,
                largest_component=self.largest_component,
                **bins_option(self.slice_bins),
            )

        return CasePredictor(
            load=lambda files: load(files[0]),
            segment=segment,
            segment_names=supports.label_names,
            algorithm_name=f"medseg incontext ({name})",
        )


@dataclass(frozen=True)
class PromptRunner(CaseRunner):
    """``medseg prompt --boxes``: a SAM-family model, its options, and each case's boxes (case -> `CaseBoxes`,
    `medseg.inference.box_table`) read from ``boxes_file``."""

    boxes_file: str
    boxes: Mapping[str, CaseBoxes] = field(default_factory=dict)
    checkpoint: str | None = None
    model_name: str | None = None
    preset: str | None = None
    device: str = "cpu"
    output_format: str = "auto"
    series: str | None = None
    frame: int | None = None
    planes: int = 1  # 3D boxes: 1 propagates, 3 votes over three planes (`Prompts.planes`)

    def absolute(self) -> CaseRunner:
        return absolute_paths(self, "boxes_file", "checkpoint")

    def model(self) -> str:
        """`content_hash` of the checkpoint (LiteMedSAM's by default) and the options that change the outputs."""
        from medseg.models.promptable.registry import INTERACTIVE_HEAD, default_checkpoint

        files = [Path(self.checkpoint) if self.checkpoint is not None else default_checkpoint()]
        if self.checkpoint is None and self.model_name == "lite_medsam_interactive":
            files.append(INTERACTIVE_HEAD)
        chosen = {k: v for k, v in (("series", self.series), ("frame", self.frame)) if v is not None}
        if self.planes != 1:  # the default leaves earlier runs' hashes as they were
            chosen["planes"] = self.planes
        return content_hash(
            files, model=self.model_name, preset=self.preset, output_format=self.output_format, **chosen
        )

    def case_model(self, model: str, case: str) -> str:
        """``model`` and the case's boxes: a case whose boxes changed is done again."""
        boxes = self.boxes.get(case)
        prompt = None if boxes is None else (boxes.boxes, boxes.boxes3d, boxes.slice_index)
        return hashlib.sha256(f"{model}{prompt!r}".encode()).hexdigest()[:16]

    def build(self) -> CasePredictor:
        from medseg.inference.engines import Segmentation
        from medseg.inference.prompt_predictor import PromptPredictor
        from medseg.inference.prompt_session import clip_to_image, segment, validate
        from medseg.io import load

        predictor = PromptPredictor.from_checkpoint(self.checkpoint, self.model_name, device=self.device)

        def segment_case(case: str, image: Image) -> Segmentation:
            boxes = self.boxes.get(case)
            if boxes is None:
                raise MedsegError(f"no box for it in {self.boxes_file}")
            prompts = replace(clip_to_image(image, boxes.prompts())[0], planes=self.planes)  # clipped: the part inside
            validate(image, prompts)
            labels = segment(predictor, image, prompts, self.preset)
            return Segmentation(labels, list(range(1, len(boxes.boxes) + len(boxes.boxes3d) + 1)), "prompt")

        return CasePredictor(
            load=lambda files: load(files[0], series=self.series, frame=self.frame),
            segment=segment_case,
            algorithm_name=f"medseg prompt ({predictor.spec.name})",
            algorithm_type="SEMIAUTOMATIC",
        )
