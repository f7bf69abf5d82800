"""3D in-context segmentation with the probe: one position-aware probe per label for a set of support volumes.

Matching slices (`InContextPredictor`'s way for support volumes) fits a probe for every query slice on the
support slices at the same relative depth: one fit per slice and label, the bulk of a volume's time. Here the
feature locations of every support slice, each with Fourier features of its relative position in the volume
(depth ``(z + 0.5) / Z``; row and column on the slice) appended, fit one `SupportProbe` per label, once per
support set; a query location carries its own position, so the probe can still tell one end of a structure
from the other (Hippocampus's anterior and posterior parts) where appearance alone cannot. Positional
encodings as in NeRF/Transformers (sin and cos of a few multiples of pi times the coordinate).

The frame side for volumes follows the supports' slices (`volume_frame_size`): their larger side rounded up
to a multiple of 16, from 64 to 128, so a small slice is not blown up four times before the encoder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medseg.models.incontext.support_probe import FEATURE_SCALE, SupportProbe, fit_support_probes
from medseg.preprocessing.frames import frame_side, label_masks

DEPTH_FREQUENCIES = (1, 2, 3)  # multiples of pi for the relative depth
PLANE_FREQUENCIES = (1, 2)  # and for the relative row and column
POSITION_CHANNELS = 2 * len(DEPTH_FREQUENCIES) + 4 * len(PLANE_FREQUENCIES)
POSITION_SCALE = 5.0  # a position feature's largest size against a unit-length feature vector's 1 (x FEATURE_SCALE)
VOLUME_PROBE_STEPS = 400  # Adam steps per label (twice a 2D probe's default: far more rows)
MAX_SUPPORT_ROWS = 1 << 18  # feature locations kept for the fit (float16: about 0.33 GB at 608 channels)
FRAME_SIDES = (64, 128)  # `volume_frame_size`'s range

ENCODE_BATCH = 8  # slices per call of the encoder
# encode: 2D slices of one shape -> their unit-length features (N, C, g, g); progress: called once per slice encoded
Encoder = Callable[[Sequence[np.ndarray]], torch.Tensor]
Progress = Callable[[], None]


def volume_frame_size(volumes: Sequence[np.ndarray]) -> int:
    """The encoder's frame side for these ``(Z, H, W[, C])`` volumes: their largest in-plane side rounded up to
    a multiple of 16, from 64 to 128."""
    return frame_side(max(max(volume.shape[1:3]) for volume in volumes), *FRAME_SIDES)


def position_rows(z: int, depth: int, grid: int) -> torch.Tensor:
    """``(grid * grid, POSITION_CHANNELS)`` float32 Fourier features of each location's relative depth, row and
    column (row-major, as a frame's locations flatten), scaled so that `SupportProbe.classify` multiplying
    them by `FEATURE_SCALE` gives them at most `POSITION_SCALE`."""
    relative = (z + 0.5) / depth
    angles = torch.tensor([np.pi * k * relative for k in DEPTH_FREQUENCIES], dtype=torch.float32)
    along_depth = torch.cat([angles.sin(), angles.cos()]).expand(grid * grid, -1)
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    rows, columns = torch.meshgrid(centres, centres, indexing="ij")
    plane = [
        f(np.pi * k * axis).flatten()
        for axis in (rows, columns)
        for k in PLANE_FREQUENCIES
        for f in (torch.sin, torch.cos)
    ]
    return torch.cat([along_depth, torch.stack(plane, 1)], 1) * (POSITION_SCALE / FEATURE_SCALE)


def location_targets(label: np.ndarray, values: Sequence[int], grid: int) -> torch.Tensor:
    """``(grid * grid, K)``: the foreground fraction of each location for each label value of a 2D label map
    (masks area-resized to ``2 grid`` and thresholded at 0.5, then the share of each location's 2 x 2 pixels:
    `FeatureMatchingPredictor`'s targets)."""
    fine = torch.from_numpy(label_masks(label, values, 2 * grid, mode="area"))
    return F.avg_pool2d(fine[:, None], 2).reshape(len(values), -1).T


def fit_volume_probes(
    encode: Encoder,
    volumes: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    values: Sequence[int],
    subsets: Sequence[np.ndarray],
    seed: int = 0,
    steps: int = VOLUME_PROBE_STEPS,
    progress: Progress | None = None,
) -> list[list[SupportProbe | None]]:
    """One `SupportProbe` per support subset and label, fitted to the locations of every slice of the subset's
    support volumes (features, then `position_rows`); None where the subset shows no example of the label.

    Args:
        encode: slices ``(H, W[, C])`` of one shape -> unit-length features ``(N, C, g, g)`` (the same ``g`` for
            every slice), called with up to `ENCODE_BATCH` slices.
        volumes: support volumes ``(Z_i, H_i, W_i[, C])``; labels: their integer label maps ``(Z_i, H_i, W_i)``.
        subsets: indices into ``volumes``, one fit per subset and label.

    Beyond `MAX_SUPPORT_ROWS` locations in all, each slice keeps an equal share of them (seeded samples): up
    to half from its locations with some foreground, the rest from its background. The fit's balanced loss
    weighs the two classes equally either way. The rows live in one float16 buffer of at most that size.
    """
    rng = np.random.default_rng(seed)
    slices = sum(volume.shape[0] for volume in volumes)
    per_slice = max(1, MAX_SUPPORT_ROWS // slices)
    rows: torch.Tensor | None = None  # allocated at the first slice, when the channels and grid are known
    filled, target_list, owner_list = 0, [], []
    for index, (volume, label) in enumerate(zip(volumes, labels, strict=True)):
        for z, features in _encoded(encode, volume):
            channels, grid = features.shape[0], features.shape[-1]
            target = location_targets(label[z], values, grid)
            keep = _kept_locations(target, per_slice, rng)
            if rows is None:
                capacity = slices * min(per_slice, grid * grid)
                rows = torch.empty(capacity, channels + POSITION_CHANNELS, dtype=torch.float16)
            located = torch.cat([features.reshape(channels, -1).T.float(), position_rows(z, volume.shape[0], grid)], 1)
            rows[filled : filled + len(keep)] = located[keep]  # float16 storage; batches are fitted in float32
            filled += len(keep)
            target_list.append(target[keep])
            owner_list.append(torch.full((len(keep),), index))
            if progress is not None:
                progress()
    assert rows is not None  # a support set has slices
    all_rows, targets, owners = rows[:filled], torch.cat(target_list), torch.cat(owner_list)
    probes: list[list[SupportProbe | None]] = []
    for subset in subsets:
        if len(subset) == len(volumes):  # every volume: the buffer itself, not a copy
            subset_rows, subset_targets = all_rows, targets
        else:
            chosen = torch.isin(owners, torch.from_numpy(np.asarray(subset)))
            subset_rows, subset_targets = all_rows[chosen], targets[chosen]
        fitted: list[SupportProbe | None] = [None] * len(values)  # None: no example of the label, no vote for it
        shown = [k for k in range(len(values)) if bool((subset_targets[:, k] > 0).any())]
        columns = []
        for k in shown:
            target = subset_targets[:, k]
            if not bool((target > 0.5).any()):  # thinner than a location everywhere: the locations it touches
                target = (target > 0).float()
            columns.append(target)
        if shown:  # the labels together: each probe exactly as its own fit gives it
            together = fit_support_probes(subset_rows, torch.stack(columns, 1), steps=steps, seed=seed, normalised=True)
            for k, probe in zip(shown, together, strict=True):
                fitted[k] = probe
        probes.append(fitted)
    return probes


def _encoded(encode: Encoder, volume: np.ndarray) -> Iterator[tuple[int, torch.Tensor]]:
    """``(z, features (C, g, g))`` for each slice of ``volume``, encoded `ENCODE_BATCH` slices at a time."""
    for start in range(0, volume.shape[0], ENCODE_BATCH):
        batch = encode(list(volume[start : start + ENCODE_BATCH]))
        yield from enumerate(batch, start)


def _kept_locations(target: torch.Tensor, budget: int, rng: np.random.Generator) -> torch.Tensor:
    """Indices of the locations of one slice kept for the fit: all when there are at most ``budget``; else up
    to ``budget // 2`` of those with some foreground (``target`` ``(L, K)``) and background for the rest."""
    if len(target) <= budget:
        return torch.arange(len(target))
    foreground = (target > 0).any(1).numpy()
    inside, outside = np.flatnonzero(foreground), np.flatnonzero(~foreground)
    inside = rng.choice(inside, min(len(inside), budget // 2), replace=False)
    outside = rng.choice(outside, min(len(outside), budget - len(inside)), replace=False)
    return torch.from_numpy(np.sort(np.concatenate([inside, outside])))


def volume_probabilities(
    encode: Encoder,
    query: np.ndarray,
    probes: Sequence[Sequence[SupportProbe | None]],
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
) -> np.ndarray:
    """Foreground probabilities ``(K, Z, 2g, 2g)`` of a query volume ``(Z, H, W[, C])``, slice by slice: each
    label's probability averaged over the subsets' probes (a subset without the label votes 0), the logits
    computed on the ``g x g`` grid (locations in ``dtype``, the probes' own) and upsampled bilinearly."""
    depth, count = query.shape[0], len(probes[0])
    slices = []
    for z, features in _encoded(encode, query):
        channels, grid = features.shape[0], features.shape[-1]
        located = torch.cat([features.reshape(channels, -1).T.float(), position_rows(z, depth, grid)], 1).to(dtype)
        total = torch.zeros(count, 2 * grid, 2 * grid)
        for subset in probes:
            for k, probe in enumerate(subset):
                if probe is not None:
                    coarse = probe.classify(located).float().reshape(1, 1, grid, grid)
                    fine = F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)[0, 0]
                    total[k] += torch.sigmoid(fine)
        slices.append(total / len(probes))
        if progress is not None:
            progress()
    return torch.stack(slices, 1).numpy()
