"""Intensity normalisation: CT windows, MR/percentile normalisation, RGB scaling, and presets.

Conventions followed:

- CT windows are (level, width) in Hounsfield units, the radiology convention (window
  ``[L - W/2, L + W/2]``); the values in `CT_WINDOWS` are the usual display defaults.
- MR normalisation is nnU-Net style: statistics on the foreground, percentile clipping (0.5 / 99.5, as in
  nnU-Net's CT scheme and MedSAM's non-CT scheme), then z-score (nnU-Net) or min-max to [0, 1] (MedSAM).
- A preset is plain data (`IntensityPreset.to_dict` / `IntensityPreset.from_dict`), so a model's
  configuration can store it as JSON.

All functions return new ``float32`` arrays; inputs are never modified.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

from medseg.errors import MedsegError
from medseg.io.image import Image

# (level, width) in HU.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40, 400),
    "abdomen": (40, 400),
    "lung": (-600, 1500),
    "brain": (40, 80),
    "bone": (400, 1800),
}

MR_MODES = ("zscore", "unit")
PRESET_NAMES = ("ct", "mr", "percentile", "rgb", "none")  # plus "ct:<window>" for each CT_WINDOWS key

_STD_EPS = 1e-8


def ct_window(array: np.ndarray, level: float, width: float) -> np.ndarray:
    """Clip to the window ``[level - width/2, level + width/2]`` (HU) and scale it linearly to [0, 1].

    Args:
        array: any shape, values in HU; ``level`` (centre) and ``width`` (> 0) in HU.

    Returns:
        ``float32`` array of the same shape with values in [0, 1] (NaN stays NaN).

    Raises:
        MedsegError: ``width`` is not positive.
    """
    if not width > 0:
        raise MedsegError(f"CT window width must be positive, got {width}")
    low = float(level) - float(width) / 2.0
    out = np.clip(np.asarray(array, dtype=np.float32), low, low + float(width))
    out -= np.float32(low)
    out /= np.float32(width)
    return out


def ct_window_by_name(array: np.ndarray, name: str) -> np.ndarray:
    """`ct_window` with the (level, width) of a named window in `CT_WINDOWS` (case-insensitive).

    Raises:
        MedsegError: unknown window name (the message lists the known ones).
    """
    level, width = _named_window(name)
    return ct_window(array, level, width)


def mr_normalize(
    array: np.ndarray,
    foreground_mask: np.ndarray | None = None,
    lower: float = 0.5,
    upper: float = 99.5,
    mode: str = "zscore",
) -> np.ndarray:
    """Percentile-clip then normalise with foreground statistics (nnU-Net / MedSAM style).

    Steps: foreground = ``foreground_mask`` if given, else voxels ``> 0`` if any, else every voxel
    (non-finite voxels are never foreground); ``lo, hi`` = the ``lower`` / ``upper`` percentiles of the
    foreground; clip the whole array to ``[lo, hi]``; then

    - ``mode="zscore"``: subtract the mean and divide by the std of the *clipped* foreground (so the
      foreground ends with mean 0 and std 1; a std below 1e-8 is treated as 1);
    - ``mode="unit"``: ``(x - lo) / (hi - lo)`` into [0, 1]; when ``hi == lo`` (one foreground value, as in a
      two-valued image) 1 from ``lo`` up and 0 below it, all zeros for a constant image.

    Args:
        array: any shape (channels are *not* separated; see `normalize` for per-channel use).
        foreground_mask: boolean array of the same shape as ``array``.
        lower, upper: percentiles in [0, 100], ``lower < upper``.
        mode: ``"zscore"`` or ``"unit"``.

    Returns:
        ``float32`` array of the same shape (NaN stays NaN, +-inf is clipped).

    Raises:
        MedsegError: bad percentiles or mode, mask of another shape, empty foreground.
    """
    _check_mode(mode, lower, upper)
    return _mr_map(array, foreground_mask, lower, upper, mode)(array)


def _mr_map(
    array: np.ndarray,
    foreground_mask: np.ndarray | None,
    lower: float,
    upper: float,
    mode: str,
    every_finite: bool = False,
) -> Callable[[np.ndarray], np.ndarray]:
    """`mr_normalize`'s statistics from ``array``, as a map that applies them to ``array`` or any part of it.

    The foreground (``foreground_mask``, else voxels > 0 if any, else every finite voxel; every finite voxel
    at once with ``every_finite``) is gathered a block of ``array``'s first axis at a time, so no float copy
    of a large volume is made (the values kept are those of the foreground only).
    """
    if foreground_mask is not None and np.shape(foreground_mask) != np.shape(array):
        raise MedsegError(
            f"foreground mask shape {np.shape(foreground_mask)} differs from image shape {np.shape(array)}"
        )
    values = _foreground_values(array, foreground_mask, positive=not every_finite)
    if values is None and foreground_mask is None and not every_finite:
        values = _foreground_values(array, None, positive=False)
    if values is None:
        raise MedsegError("no foreground voxels to compute intensity statistics on")
    lo, hi = _percentile(values, lower), _percentile(values, upper)
    if mode == "unit":
        below_any = hi <= lo and _any_below(array, lo)

        def unit(part: np.ndarray) -> np.ndarray:
            out = np.clip(np.asarray(part, dtype=np.float32), lo, hi)
            if hi > lo:
                out -= np.float32(lo)
                out /= np.float32(hi - lo)
            else:  # one foreground value (a two-valued image): it is 1, anything below it 0, not all blanked to 0
                out[np.isfinite(out)] = 1.0 if below_any else 0.0
                out[np.asarray(part, dtype=np.float32) < np.float32(lo)] = 0.0
            return out

        return unit
    clipped = np.clip(values.astype(np.float64), lo, hi)
    mean, std = float(clipped.mean()), float(clipped.std())
    del values, clipped

    def zscore(part: np.ndarray) -> np.ndarray:
        out = np.clip(np.asarray(part, dtype=np.float32), lo, hi)
        out -= np.float32(mean)
        out /= np.float32(std if std > _STD_EPS else 1.0)
        return out

    return zscore


_BLOCK_VOXELS = 1 << 22  # voxels per block when gathering statistics


def _foreground_values(array: np.ndarray, mask: np.ndarray | None, positive: bool) -> np.ndarray | None:
    """The values (as the float32 map sees them) of the finite voxels in ``mask`` (or ``> 0`` when
    ``positive``, or all finite ones), in C order; None when there are none. Integers of up to 16 bits keep
    their own type (exact in float32, and 2 bytes a voxel instead of 4)."""
    data = np.asarray(array)
    if data.ndim == 0:
        data = data.reshape(1)
    own = data.dtype.kind in "biu" and data.dtype.itemsize <= 2
    step = max(1, _BLOCK_VOXELS // max(1, data[0].size))
    blocks = range(0, data.shape[0], step)

    def kept(start: int) -> np.ndarray:
        block = np.asarray(data[start : start + step], dtype=np.float32)
        keep = np.isfinite(block)
        if mask is not None:
            keep &= np.asarray(mask[start : start + step], dtype=bool)
        elif positive:
            keep &= block > 0
        return keep

    # Counted first, then filled: no list of parts beside their concatenation.
    total = sum(int(np.count_nonzero(kept(start))) for start in blocks)
    if total == 0:
        return None
    values = np.empty(total, data.dtype if own else np.float32)
    filled = 0
    for start in blocks:
        part = np.asarray(data[start : start + step], dtype=None if own else np.float32)[kept(start)]
        values[filled : filled + part.size] = part
        filled += part.size
    return values


def _any_below(array: np.ndarray, level: float) -> bool:
    """Whether any finite value of ``array`` (as float32) is below ``level``, a block at a time."""
    data = np.asarray(array)
    if data.ndim == 0:
        data = data.reshape(1)
    step = max(1, _BLOCK_VOXELS // max(1, data[0].size))
    return any(
        bool((np.asarray(data[start : start + step], dtype=np.float32) < np.float32(level)).any())
        for start in range(0, data.shape[0], step)
    )


def _percentile(values: np.ndarray, q: float) -> float:
    """``np.percentile(values.astype(float64), q)`` (linear method, the same arithmetic) without the float64
    copy: ``values`` (finite, non-empty) is partially sorted in place and only two order statistics are read."""
    count = values.size
    virtual = (count - 1) * (np.float64(q) / 100.0)
    below = int(np.floor(virtual))
    above = min(below + 1, count - 1)
    gamma = float(virtual - below)
    values.partition([below, above] if above != below else [below])
    a, b = float(values[below]), float(values[above])
    difference = b - a
    result = b - difference * (1.0 - gamma) if gamma >= 0.5 else a + difference * gamma
    return a if a == b else result


def rgb_to_unit(array: np.ndarray) -> np.ndarray:
    """Scale 8/16-bit colour or grey pixel values to [0, 1].

    ``uint8`` / 255, ``uint16`` / 65535, bool as 0/1, other integer types by the smallest of 255 / 65535
    that covers their maximum; floats are kept when their maximum is <= 1, else divided by 255.

    Args:
        array: any shape, e.g. ``(y, x, 3)``. Returns a ``float32`` array of the same shape.

    Raises:
        MedsegError: integer values above 65535, or float values above 255 (not an 8-bit range).
    """
    return _rgb_map(array)(array)


def _rgb_map(array: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """`rgb_to_unit`'s scale from all of ``array``, as a map for ``array`` or any part of it."""
    a = np.asarray(array)
    if a.dtype.kind == "b":
        return lambda part: np.asarray(part, dtype=np.float32)
    peak = float(np.nanmax(a)) if a.size else 0.0
    integer = a.dtype.kind in "iu"
    scale = 65535 if a.dtype == np.uint16 or (integer and peak > 255) else 255 if integer or peak > 1 else 1
    if peak > scale:
        raise MedsegError(f"pixel values up to {peak:g} are not 8-bit, 16-bit or [0, 1] values")
    return lambda part: np.asarray(part).astype(np.float32) / np.float32(scale)


@dataclass(frozen=True)
class IntensityPreset:
    """How to normalise one image's intensities; plain data that round-trips through JSON.

    ``name`` is one of:

    - ``"ct:<window>"``: a named window of `CT_WINDOWS` (``level``/``width`` must be unset);
    - ``"ct"``: an explicit window, ``level`` and ``width`` in HU required;
    - ``"mr"``: `mr_normalize` with the default foreground (voxels > 0), ``mode``, ``lower``, ``upper``;
    - ``"percentile"``: the same over *all* pixels (grey X-ray, ultrasound, microscopy);
    - ``"rgb"``: `rgb_to_unit`;
    - ``"none"``: leave the array unchanged.

    Raises:
        MedsegError: unknown name, window or mode, or missing / superfluous level and width.
    """

    name: str
    level: float | None = None
    width: float | None = None
    mode: str = "zscore"
    lower: float = 0.5
    upper: float = 99.5

    def __post_init__(self) -> None:
        kind, _, window = self.name.partition(":")
        if kind not in PRESET_NAMES or (window and kind != "ct"):
            known = ", ".join([*PRESET_NAMES, *(f"ct:{w}" for w in CT_WINDOWS)])
            raise MedsegError(f"unknown intensity preset {self.name!r} (known: {known})")
        has_window = self.level is not None or self.width is not None
        if kind == "ct" and window:
            _named_window(window)
            if has_window:
                raise MedsegError(f"preset {self.name!r} names its window; do not also give level/width")
        elif kind == "ct" and (self.level is None or self.width is None):
            raise MedsegError("preset 'ct' needs both level and width (HU), or use 'ct:<window>'")
        elif kind != "ct" and has_window:
            raise MedsegError(f"preset {self.name!r} takes no level/width")
        _check_mode(self.mode, self.lower, self.upper)

    def window(self) -> tuple[float, float]:
        """(level, width) in HU of a CT preset; MedsegError for other presets."""
        kind, _, window = self.name.partition(":")
        if kind != "ct":
            raise MedsegError(f"preset {self.name!r} is not a CT window")
        if window:
            return _named_window(window)
        assert self.level is not None and self.width is not None  # checked in __post_init__
        return float(self.level), float(self.width)

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IntensityPreset:
        """Inverse of `to_dict`; missing optional fields take their defaults.

        Raises:
            MedsegError: not a mapping, unknown keys, missing ``name``, wrongly typed values.
        """
        if not isinstance(data, dict):
            raise MedsegError(f"intensity preset must be a mapping, got {type(data).__name__}")
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown or "name" not in data:
            raise MedsegError(f"intensity preset needs 'name' and only keys {sorted(allowed)}, got {data}")
        values: dict[str, Any] = dict(data)
        for key, value in data.items():
            if key in ("name", "mode"):
                ok = isinstance(value, str)
            elif value is None:
                ok = key in ("level", "width")
            else:
                ok = isinstance(value, int | float) and not isinstance(value, bool)
                values[key] = float(value) if ok else value
            if not ok:
                raise MedsegError(f"intensity preset {key!r} has an invalid value {value!r}")
        return cls(**values)


def holds_no_hounsfield_units(image: Image) -> bool:
    """True for 8-bit (and boolean) pixels: a photograph, screenshot or exported PNG/JPEG, whose 0..255 levels
    cannot be Hounsfield units (air is -1000 HU, bone above 300); CT in HU needs at least 16 bits."""
    return image.array.dtype in (np.uint8, np.int8, np.bool_)


def check_preset_fits(image: Image, preset: IntensityPreset) -> None:
    """Raise unless ``preset`` can apply to ``image``: a named CT window (``ct:lung``..., in Hounsfield units) on
    8-bit pixels cannot. A plain ``ct`` window is allowed: a plan derives its level and width from its own
    training data's percentiles (nnU-Net's CT scheme), which are in whatever units those images hold.

    Raises:
        MedsegError: as above, naming the image's file (``meta["path"]``).
    """
    kind, _, window = preset.name.partition(":")
    if kind != "ct" or not window or not holds_no_hounsfield_units(image):
        return
    raise MedsegError(
        f"intensity preset {preset.name} is a CT window in Hounsfield units, but this {image.array.dtype} "
        "image's 8-bit levels hold none: choose another preset (e.g. none or percentile)",
        image.meta.get("path"),
    )


def normalize(image: Image, preset: IntensityPreset) -> Image:
    """Apply ``preset`` to ``image``'s intensities; geometry, channels and meta are kept.

    ``"mr"`` and ``"percentile"`` normalise each channel of a multi-channel image separately (e.g.
    stacked MR sequences); CT windows and ``"rgb"`` act on every value alike.

    Returns:
        A new `Image` with a ``float32`` array of the same shape (``"none"``: the same array).

    Raises:
        MedsegError: as `mr_normalize`, `rgb_to_unit` and `check_preset_fits` (a named CT window on 8-bit pixels).
    """
    if preset.name == "none":
        return replace(image)
    return replace(image, array=intensity_map(image, preset)(image.array))


def intensity_map(image: Image, preset: IntensityPreset) -> Callable[[np.ndarray], np.ndarray]:
    """What `normalize` does to ``image``, as a map: statistics (percentiles, peak) come from the whole image,
    and the map applies them to ``image.array`` or any part of it with the same result, e.g. one slice
    ``(H, W[, C])`` of a volume at a time, so a large volume is never copied whole.

    Returns:
        A function from an array (``image.array`` or a slab/slice of it, channels last) to ``float32``.

    Raises:
        MedsegError: as `mr_normalize`, `rgb_to_unit` and `check_preset_fits` (a named CT window on 8-bit pixels).
    """
    check_preset_fits(image, preset)
    kind = preset.name.partition(":")[0]
    array = image.array
    if kind == "none":
        return lambda part: part
    if kind == "ct":
        level, width = preset.window()
        return lambda part: ct_window(part, level, width)
    if kind == "rgb":
        return _rgb_map(array)

    def one(channel: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        return _mr_map(channel, None, preset.lower, preset.upper, preset.mode, every_finite=kind == "percentile")

    if image.channels == 1:
        return one(array)
    maps = [one(array[..., c]) for c in range(image.channels)]
    return lambda part: np.stack([m(part[..., c]) for c, m in enumerate(maps)], axis=-1)


def preset_for_modality(modality: str, channels: int = 1) -> IntensityPreset:
    """A sensible default preset for a modality name (DICOM codes accepted, case-insensitive).

    - ``"CT"`` -> ``ct:soft_tissue`` (level 40, width 400 HU);
    - ``"MR"`` / ``"MRI"`` -> ``mr`` z-score (nnU-Net);
    - 3 channels (or modality ``"RGB"``) -> ``rgb``;
    - anything else (X-ray, ultrasound, microscopy, PET, unknown) -> ``percentile`` 0.5-99.5 clip
      then min-max to [0, 1] (``mode="unit"``, MedSAM's non-CT convention).
    """
    code = modality.strip().upper()
    if code == "CT":
        return IntensityPreset("ct:soft_tissue")
    if code in ("MR", "MRI"):
        return IntensityPreset("mr")
    if channels == 3 or code == "RGB":
        return IntensityPreset("rgb")
    return IntensityPreset("percentile", mode="unit")


def _named_window(name: str) -> tuple[float, float]:
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    if key not in CT_WINDOWS:
        raise MedsegError(f"unknown CT window {name!r} (known: {', '.join(CT_WINDOWS)})")
    level, width = CT_WINDOWS[key]
    return float(level), float(width)


def _check_mode(mode: str, lower: float, upper: float) -> None:
    if mode not in MR_MODES:
        raise MedsegError(f"unknown normalisation mode {mode!r} (known: {', '.join(MR_MODES)})")
    if not 0 <= lower < upper <= 100:
        raise MedsegError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {lower}, {upper}")
