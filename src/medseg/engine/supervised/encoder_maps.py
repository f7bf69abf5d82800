"""A frozen pretrained encoder's maps computed once per training case, and the decoder trained on them.

With ``--backbone litemedsam`` and the encoder frozen (the default), a training step spends most of its time in
the encoder, whose maps of an image never change. Where every training case fits in one patch (2D), each case
is padded to the patch (centred, zeros: what `medseg.engine.supervised.data.crop` fills) and encoded once
(`cache_encoder_maps`, in float16 in host memory); the decoder then trains on batches of cached maps
(`MapSampler`). The price: no augmentation but the cached maps flipped with their labels along the plan's
axes, which is not the maps of a mirrored image (the encoder is not mirror-equivariant: a perturbation, not a
mirror); rotation, scaling, elastic deformation, intensity changes and true mirroring would need the encoder again.
The frozen-feature training of linear probes and adapters on foundation models (e.g. DINOv2's linear
segmentation; SAM adapters that cache image embeddings).

`map_cache_refusal` says why a run cannot use cached maps (then it trains on augmented patches as before).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from medseg.engine.supervised.data import PreparedCase, crop
from medseg.models.supervised.litemedsam_unet import MAP_CHANNELS
from medseg.planning import Plan

HOST_MEMORY_SHARE = 0.4  # of the machine's RAM, the most the cached maps may take
# of the remaining training budget, the most encoding may take: a run without cached maps would see each case
# at most budget / encoding times in that budget, while the decoder's steps on cached maps cost a small part of
# an encoder step, so the rest of the budget trains far more than the encoding cost
TIME_SHARE = 0.8
ENCODE_BATCH = 4


@dataclass
class EncoderMaps:
    """``maps``: one float16 tensor ``(N, C, h, w)`` per encoder map (`LiteMedSAMUNet.encode`'s order);
    ``images`` ``(N, C, *patch)`` float32 and ``labels`` ``(N, *patch)`` uint8: the padded cases."""

    maps: list[torch.Tensor]
    images: torch.Tensor
    labels: torch.Tensor
    seconds: float


def map_bytes(plan: Plan, cases: int) -> int:
    """Host memory of ``cases`` cached LiteMedSAM maps at the plan's patch (float16)."""
    return cases * 2 * sum(c * int(np.prod([p // f for p in plan.patch_size])) for c, f in MAP_CHANNELS)


def map_cache_refusal(plan: Plan, cases: list[PreparedCase], genseg: bool, processes: int) -> str | None:
    """Why training cannot run on cached encoder maps, or None when it can: a frozen LiteMedSAM encoder, no
    GenSeg (its generated images change every step), one process, every case within one patch, and the maps
    within `HOST_MEMORY_SHARE` of the RAM."""
    network = plan.network
    if network.backbone != "litemedsam":
        return "no pretrained encoder"
    if not network.freeze_encoder:
        return "the encoder is fine-tuned (its maps change at every step)"
    if genseg:
        return "GenSeg's generated images need the encoder at every step"
    if processes > 1:
        return "several processes"
    patch = np.array(plan.patch_size)
    larger = [c.name for c in cases if (np.array(c.label.shape) > patch).any()]
    if larger:
        return f"{len(larger)} training cases are larger than the patch {plan.patch_size} (e.g. {larger[0]})"
    need = map_bytes(plan, len(cases))
    have = HOST_MEMORY_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        return f"the maps of {len(cases)} cases need {need / 1e9:.1f} GB, more than {have / 1e9:.1f} GB of RAM"
    return None


def cache_encoder_maps(
    network: torch.nn.Module, cases: list[PreparedCase], plan: Plan, device: torch.device, budget_s: float
) -> EncoderMaps | str:
    """Every case padded to the patch and encoded by ``network.encode`` (a `LiteMedSAMUNet`), or the reason it
    was given up: the second batch's time (the first one's includes building the encoder's inference copy) says
    the whole would take more than `TIME_SHARE` of ``budget_s`` (seconds of training left; ``inf`` without a
    budget)."""
    started = time.perf_counter()
    patch = np.array(plan.patch_size)
    padded = [crop(c.image, c.label, np.array(c.label.shape) // 2, patch) for c in cases]
    images = torch.from_numpy(np.stack([p[0] for p in padded]))
    labels = torch.from_numpy(np.stack([p[1] for p in padded]))
    maps: list[torch.Tensor] = []
    network.eval()
    with torch.no_grad():
        for start in range(0, len(cases), ENCODE_BATCH):
            batch_started = time.perf_counter()
            batch = network.encode(images[start : start + ENCODE_BATCH].to(device))  # type: ignore[operator]
            if not maps:
                maps = [torch.empty((len(cases), *m.shape[1:]), dtype=torch.float16) for m in batch]
            if start == ENCODE_BATCH and start + len(batch[0]) < len(cases):  # the second batch, more to come
                per_case = (time.perf_counter() - batch_started) / len(batch[0])
                estimate = time.perf_counter() - started + per_case * (len(cases) - start - len(batch[0]))
                if estimate > TIME_SHARE * budget_s:
                    return (
                        f"encoding {len(cases)} cases would take about {estimate:.1f} s, more than "
                        f"{TIME_SHARE:.0%} of the {budget_s:.1f} s of training left"
                    )
            for store, value in zip(maps, batch, strict=True):
                store[start : start + len(value)] = value.to("cpu", torch.float16)
    return EncoderMaps(maps, images, labels, time.perf_counter() - started)


class MapSampler:
    """Batches of cached maps, images and labels, each entry's maps, image and label flipped together along
    the plan's axes with probability 1/2 per axis; every draw comes from ``rng``."""

    def __init__(self, cached: EncoderMaps, plan: Plan) -> None:
        self.cached = cached
        self.mirror_axes = list(plan.mirror_axes)

    def batch(self, size: int, rng: np.random.Generator) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """``(maps: float32 (B, C, h, w) each, images (B, C, *patch) float32, labels (B, 1, *patch) int64)``."""
        picked = [int(rng.integers(len(self.cached.labels))) for _ in range(size)]
        entries = []
        for index in picked:
            flips = [axis for axis in self.mirror_axes if rng.random() < 0.5]
            maps = [m[index].float() for m in self.cached.maps]
            image, label = self.cached.images[index], self.cached.labels[index]
            if flips:  # spatial axis a is dimension a + 1 of a (C, *spatial) tensor
                dims = [axis + 1 for axis in flips]
                maps = [m.flip(dims) for m in maps]
                image, label = image.flip(dims), label.flip(flips)
            entries.append((maps, image, label))
        maps = [torch.stack([e[0][k] for e in entries]) for k in range(len(self.cached.maps))]
        images = torch.stack([e[1] for e in entries])
        labels = torch.stack([e[2] for e in entries])[:, None].long()
        return maps, images, labels
