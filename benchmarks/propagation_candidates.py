"""Candidate 3D-box propagation rules scored by ``propagation_rules.py`` (dev only)."""

from __future__ import annotations

import numpy as np
from _prompt_pipeline import Slices, projected_box

from medseg.inference.propagation import bounding_box, widened


def _all_projected(volume: Slices, box: tuple[float, ...]) -> dict[int, tuple[np.ndarray, float]]:
    x0, y0, z0, x1, y1, z1 = box
    return {z: volume.decode(z, (x0, y0, x1, y1)) for z in range(int(z0), int(z1) + 1)}


def refine(volume: Slices, box: tuple[float, ...]) -> np.ndarray:
    x0, y0, _z0, x1, y1, _z1 = box
    user = (x0, y0, x1, y1)
    out = np.zeros(volume.shown.shape[:3], bool)
    plane = out.shape[1:]
    for z, (mask, _s) in _all_projected(volume, box).items():
        if mask.any():
            mask = volume.decode(z, widened(bounding_box(mask), volume.predictor, plane, user))[0]
        out[z] = mask
    return out


def _propagate(
    volume: Slices, box: tuple[float, ...], start: int, start_mask: np.ndarray
) -> dict[int, tuple[np.ndarray, float]]:
    x0, y0, z0, x1, y1, z1 = box
    user = (x0, y0, x1, y1)
    plane = volume.shown.shape[1:3]
    found = {start: (start_mask, 1.0)}
    for step in (1, -1):
        previous = start_mask
        z = start + step
        while int(z0) <= z <= int(z1):
            if previous.any():
                mask, score = volume.decode(z, widened(bounding_box(previous), volume.predictor, plane, user))
            else:
                mask, score = np.zeros(plane, bool), 0.0
            if not mask.any():
                mask, score = volume.decode(z, user)
            found[z] = (mask, score)
            if mask.any():
                previous = mask
            z += step
    return found


def _stack(volume: Slices, masks: dict[int, np.ndarray]) -> np.ndarray:
    out = np.zeros(volume.shown.shape[:3], bool)
    for z, m in masks.items():
        out[z] = m
    return out


def anchor(volume: Slices, box: tuple[float, ...]) -> np.ndarray:
    projected = _all_projected(volume, box)
    start = max(projected, key=lambda z: projected[z][1])
    return _stack(volume, {z: m for z, (m, _s) in _propagate(volume, box, start, projected[start][0]).items()})


def anchor_select(volume: Slices, box: tuple[float, ...]) -> np.ndarray:
    projected = _all_projected(volume, box)
    start = max(projected, key=lambda z: projected[z][1])
    found = _propagate(volume, box, start, projected[start][0])
    return _stack(volume, {z: (m if s >= projected[z][1] else projected[z][0]) for z, (m, s) in found.items()})


def middle_select(volume: Slices, box: tuple[float, ...]) -> np.ndarray:
    projected = _all_projected(volume, box)
    start = round((box[2] + box[5]) / 2)
    found = _propagate(volume, box, start, projected[start][0])
    return _stack(volume, {z: (m if s >= projected[z][1] else projected[z][0]) for z, (m, s) in found.items()})


def fill_anchor(volume: Slices, box: tuple[float, ...]) -> np.ndarray:
    """Start where the projected box's mask fills its box best (the box is tight there)."""
    x0, y0, _z0, x1, y1, _z1 = box
    projected = _all_projected(volume, box)

    def fit(z: int) -> float:
        mask = projected[z][0]
        if not mask.any():
            return 0.0
        a, b, c, d = bounding_box(mask)
        return ((c - a) * (d - b)) / ((x1 - x0) * (y1 - y0))

    start = max(projected, key=fit)
    return _stack(volume, {z: m for z, (m, _s) in _propagate(volume, box, start, projected[start][0]).items()})


RULES = {
    "refine": refine,
    "anchor": anchor,
    "anchor+select": anchor_select,
    "middle+select": middle_select,
    "fill anchor": fill_anchor,
}


def _frame_pixels(volume: Slices) -> float:
    return max(volume.shown.shape[1:3]) / volume.predictor.spec.image_size


def _grow(box: tuple[float, float, float, float], margin: float, user: tuple[float, ...]) -> tuple[float, ...]:
    x0, y0, x1, y1 = box
    return (max(x0 - margin, user[0]), max(y0 - margin, user[1]), min(x1 + margin, user[2]), min(y1 + margin, user[3]))


def _walk(volume: Slices, box: tuple[float, ...], choose) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Middle slice from the user's box, then each slice from ``choose(z, previous_mask, user)``."""
    x0, y0, z0, x1, y1, z1 = box
    user = (x0, y0, x1, y1)
    out = np.zeros(volume.shown.shape[:3], bool)
    start = round((z0 + z1) / 2)
    out[start] = volume.decode(start, user)[0]
    for step in (1, -1):
        previous = out[start]
        z = start + step
        while int(z0) <= z <= int(z1):
            mask = choose(z, previous, user) if previous.any() else volume.decode(z, user)[0]
            out[z] = mask
            if mask.any():
                previous = mask
            z += step
    return out


def tight_floor(volume: Slices, box: tuple[float, ...]) -> np.ndarray:
    """The reference's +3 px neighbour box; where the mask shrinks below half its neighbour's, medseg's wider box."""
    shift = 3 * _frame_pixels(volume)
    plane = volume.shown.shape[1:3]

    def choose(z: int, previous: np.ndarray, user: tuple[float, ...]) -> np.ndarray:
        mask = volume.decode(z, _grow(bounding_box(previous), shift, user))[0]
        if mask.sum() < 0.5 * previous.sum():
            mask = volume.decode(z, widened(bounding_box(previous), volume.predictor, plane, user))[0]
        return mask

    return _walk(volume, box, choose)


def agree(volume: Slices, box: tuple[float, ...]) -> np.ndarray:
    """The projected box's mask where it agrees with the propagated one (Dice >= 0.7), else the propagated."""
    plane = volume.shown.shape[1:3]

    def choose(z: int, previous: np.ndarray, user: tuple[float, ...]) -> np.ndarray:
        mask = volume.decode(z, widened(bounding_box(previous), volume.predictor, plane, user))[0]
        whole = volume.decode(z, user)[0]
        overlap = 2 * (mask & whole).sum() / max(mask.sum() + whole.sum(), 1)
        return whole if overlap >= 0.7 else mask

    return _walk(volume, box, choose)


def best_score(volume: Slices, box: tuple[float, ...]) -> np.ndarray:
    """Of the +3 px box, medseg's widened box and the user's box, the mask with the highest predicted IoU."""
    shift = 3 * _frame_pixels(volume)
    plane = volume.shown.shape[1:3]

    def choose(z: int, previous: np.ndarray, user: tuple[float, ...]) -> np.ndarray:
        near = bounding_box(previous)
        tries = [_grow(near, shift, user), widened(near, volume.predictor, plane, user), user]
        return max((volume.decode(z, t) for t in tries), key=lambda r: r[1])[0]

    return _walk(volume, box, choose)


def reference_scheme(volume: Slices, box: tuple[float, ...]) -> np.ndarray:
    from _prompt_pipeline import litemedsam_scheme

    return litemedsam_scheme(volume, box)


RULES.update({"reference": reference_scheme, "tight+floor": tight_floor, "agree": agree, "best score": best_score})
for _name in ("refine", "anchor", "fill anchor"):
    RULES.pop(_name)


class _Oriented:
    """The volume's model inputs sliced along axis 1 (rows) or 2 (columns), embeddings cached on disk."""

    def __init__(self, volume: Slices, axis: int) -> None:
        import torch

        self.torch, self.volume, self.axis = torch, volume, axis
        order = (1, 0, 2) if axis == 1 else (2, 0, 1)
        self.shown = np.ascontiguousarray(volume.shown.transpose(*order, *range(3, volume.shown.ndim)))
        self.folder = volume.folder / f"axis{axis}"  # type: ignore[attr-defined]
        self.folder.mkdir(exist_ok=True)

    def decode(self, index: int, box: tuple[float, ...]) -> np.ndarray:
        from medseg.inference.prompt_predictor import clip_to_box

        predictor = self.volume.predictor
        key = (self.volume.key, self.axis, index)
        path = self.folder / f"{index}.pt"
        if key not in predictor._cache and path.is_file():
            predictor._cache[key] = self.torch.load(path)
        predictor.set_image(self.shown[index], key=key)
        if not path.is_file():
            self.torch.save(predictor._cache[key], path)
        result = predictor.predict(boxes=[list(box)])
        return clip_to_box(result.logits[0], list(box)) > 0


def _projected_along(volume: Slices, box: tuple[float, ...], axis: int) -> np.ndarray:
    x0, y0, z0, x1, y1, z1 = box
    out = np.zeros(volume.shown.shape[:3], bool)
    if axis == 0:
        return projected_box(volume, box)
    oriented = _Oriented(volume, axis)
    if axis == 1:
        for y in range(int(y0), int(y1)):
            out[:, y, :] = oriented.decode(y, (x0, z0, x1, z1 + 1))
    else:
        for x in range(int(x0), int(x1)):
            out[:, :, x] = oriented.decode(x, (y0, z0, y1, z1 + 1))
    return out


def vote2(volume: Slices, box: tuple[float, ...]) -> np.ndarray:
    masks = [_projected_along(volume, box, a) for a in (0, 1, 2)]
    return (masks[0].astype(int) + masks[1] + masks[2]) >= 2


def and3(volume: Slices, box: tuple[float, ...]) -> np.ndarray:
    masks = [_projected_along(volume, box, a) for a in (0, 1, 2)]
    return masks[0] & masks[1] & masks[2]


def rows_only(volume: Slices, box: tuple[float, ...]) -> np.ndarray:
    return _projected_along(volume, box, 1)


def columns_only(volume: Slices, box: tuple[float, ...]) -> np.ndarray:
    return _projected_along(volume, box, 2)


RULES.update({"vote2": vote2, "and3": and3, "rows": rows_only, "columns": columns_only})


def _extents(volume: Slices, box: tuple[float, ...], lines: int) -> dict[int, list[float]]:
    """Per axial slice z: [x0, y0, x1, y1] from masks on ``lines`` row slices and column slices of the box."""
    x0, y0, z0, x1, y1, z1 = box
    found: dict[int, list[float]] = {}
    for axis, (lo, hi) in ((1, (y0, y1)), (2, (x0, x1))):
        oriented = _Oriented(volume, axis)
        for f in np.linspace(0, 1, lines + 2)[1:-1]:
            index = int(lo + f * (hi - lo))
            plane_box = (x0, z0, x1, z1 + 1) if axis == 1 else (y0, z0, y1, z1 + 1)
            mask = oriented.decode(index, plane_box)  # rows = z, columns = x (axis 1) or y (axis 2)
            for z in np.flatnonzero(mask.any(axis=1)):
                cols = np.flatnonzero(mask[z])
                entry = found.setdefault(int(z), [np.inf, np.inf, -np.inf, -np.inf])
                a, b = (0, 2) if axis == 1 else (1, 3)
                entry[a] = min(entry[a], float(cols[0]))
                entry[b] = max(entry[b], float(cols[-1] + 1))
    return found


def _guided(volume: Slices, box: tuple[float, ...], lines: int, margin: float) -> np.ndarray:
    x0, y0, z0, x1, y1, z1 = box
    user = (x0, y0, x1, y1)
    extents = _extents(volume, box, lines)
    out = np.zeros(volume.shown.shape[:3], bool)
    for z in range(int(z0), int(z1) + 1):
        e = extents.get(z)
        guess = list(user)
        if e is not None:
            for k in (0, 1, 2, 3):
                if np.isfinite(e[k]):
                    guess[k] = e[k]
        w, h = guess[2] - guess[0], guess[3] - guess[1]
        m = margin * max(w, h) + 1.0
        prompt = (max(guess[0] - m, x0), max(guess[1] - m, y0), min(guess[2] + m, x1), min(guess[3] + m, y1))
        if prompt[2] - prompt[0] < 1 or prompt[3] - prompt[1] < 1:
            prompt = user
        out[z] = volume.decode(z, prompt)[0]
    return out


RULES.update(
    {
        "guide1": lambda v, b: _guided(v, b, 1, 0.1),
        "guide3": lambda v, b: _guided(v, b, 3, 0.1),
        "guide3 m0": lambda v, b: _guided(v, b, 3, 0.0),
        "guide5": lambda v, b: _guided(v, b, 5, 0.1),
    }
)


def _strided_along(volume: Slices, box: tuple[float, ...], axis: int, stride: int) -> np.ndarray:
    """As `_projected_along` on every ``stride``-th slice of the box; the others copy the nearest computed one."""
    x0, y0, z0, x1, y1, z1 = box
    out = np.zeros(volume.shown.shape[:3], bool)
    oriented = _Oriented(volume, axis)
    lo, hi = (int(y0), int(y1)) if axis == 1 else (int(x0), int(x1))
    count = hi - lo
    computed = sorted({lo + round(i) for i in np.linspace(0, count - 1, max(1, -(-count // stride)))})
    plane_box = (x0, z0, x1, z1 + 1) if axis == 1 else (y0, z0, y1, z1 + 1)
    masks = {i: oriented.decode(i, plane_box) for i in computed}
    for i in range(lo, hi):
        nearest = min(computed, key=lambda c: abs(c - i))
        if axis == 1:
            out[:, i, :] = masks[nearest]
        else:
            out[:, :, i] = masks[nearest]
    return out


def _vote(volume: Slices, box: tuple[float, ...], stride: int, axial) -> np.ndarray:  # type: ignore[no-untyped-def]
    first = axial(volume, box)
    return (first.astype(int) + _strided_along(volume, box, 1, stride) + _strided_along(volume, box, 2, stride)) >= 2


RULES.update(
    {
        "vote2 s2": lambda v, b: _vote(v, b, 2, projected_box),
        "vote2 s3": lambda v, b: _vote(v, b, 3, projected_box),
        "vote2 guide5": lambda v, b: _vote(v, b, 1, lambda v2, b2: _guided(v2, b2, 5, 0.1)),
    }
)
