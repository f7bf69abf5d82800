"""An image's pixels as LiteMedSAM's training images were made: the intensity rule and 8-bit levels.

MedSAM's preprocessing scripts (``pre_grey_rgb.py``, ``pre_CT_MR.py``) window or percentile-clip each
image and store it as ``np.uint8``; the weights were trained on those levels. `model_input` gives a whole
image so; `ModelSlices` gives a volume's slices one at a time with the same values (its statistics come
from the whole volume), so a large volume is never copied whole.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from medseg.io import Image
from medseg.preprocessing import IntensityPreset, intensity_map
from medseg.preprocessing.intensity import holds_no_hounsfield_units
from medseg.preprocessing.statistics import constant_value

# Images whose values span at least this range from at most -500 are taken to be CT in HU.
_HU_MIN, _HU_MAX = -500.0, 300.0


def intensity_preset(image: Image, preset: str | None) -> IntensityPreset:
    """The preset to display-normalise ``image`` for prompting, as LiteMedSAM's training images were made.

    ``preset`` names one (``ct:soft_tissue``, ``ct:lung``, ``ct:brain``, ``ct:bone``, ``mr``,
    ``percentile``, ``rgb``, ``none``); None picks by the rule of MedSAM's preprocessing scripts:

    - RGB -> ``rgb``; a 2D grey image of integers (8- or 16-bit) -> ``none``: the model's own min-max
      scaling (``pre_grey_rgb.py`` min-max scales such images to 8 bits);
    - CT (DICOM Modality CT, or values from below -500 to above 300, Hounsfield units) -> ``ct:soft_tissue``
      (``pre_CT_MR.py`` windows CT); never 8-bit pixels, which hold no Hounsfield units;
    - anything else (MR and other volumes, float images) -> ``mr``: clipped at the 0.5 / 99.5 percentiles of
      the non-zero voxels and scaled to [0, 1], so a zero background stays 0 (``pre_CT_MR.py``'s non-CT
      branch); all voxels count when none is above zero.
    """
    if preset is not None:
        return IntensityPreset(preset, mode="unit") if preset in ("mr", "percentile") else IntensityPreset(preset)
    if image.channels == 3:
        return IntensityPreset("rgb")
    array = image.array
    is_ct = not holds_no_hounsfield_units(image) and (  # an 8-bit "CT" is a screenshot: no HU to window
        str(image.meta.get("modality", "")).upper() == "CT"
        or (array.dtype.kind in "if" and float(array.min()) <= _HU_MIN and float(array.max()) >= _HU_MAX)
    )
    if is_ct:
        return IntensityPreset("ct:soft_tissue")
    if image.ndim == 2 and array.dtype.kind in "iub":  # 2D display images: min-max scaled by the model
        return IntensityPreset("none")
    return IntensityPreset("mr", mode="unit")


def model_input(image: Image, preset: str | None = None) -> np.ndarray:
    """``image``'s pixels as LiteMedSAM's training images were stored: 8-bit levels (float32, 0..255).

    `intensity_preset` chooses the normalisation; its [0, 1] output is scaled to 0..255 and truncated to whole
    levels (``np.uint8`` of MedSAM's ``pre_CT_MR.py``); with ``none``, values already in 0..255 are truncated
    as they are, others min-max scaled to 0..255 first (``pre_grey_rgb.py``). Shape as ``image.array``.

    Raises:
        MedsegError: an unknown preset; a CT window on 8-bit pixels (`check_preset_fits`).
    """
    return ModelSlices(image, preset).levels(image.array)


class ModelSlices:
    """A volume's slices ``(H, W[, C])`` as `model_input` gives them, each made when asked for.

    ``slices[z]`` equals ``model_input(image, preset)[z]``; only the statistics (percentiles, range) are taken
    from the whole volume up front. ``shape`` is ``image.array``'s.

    Raises:
        MedsegError: an unknown preset (on construction).
    """

    def __init__(self, image: Image, preset: str | None = None) -> None:
        chosen = intensity_preset(image, preset)
        self._array = image.array
        self.shape: tuple[int, ...] = tuple(image.array.shape)
        self._map: Callable[[np.ndarray], np.ndarray] = intensity_map(image, chosen)
        self._unit = chosen.name != "none"  # the map's output is in [0, 1]
        self._rescale: tuple[float, float] | None = None
        if not self._unit and image.array.size:
            low, high = float(image.array.min()), float(image.array.max())
            if low < 0 or high > 255:
                self._rescale = (low, max(high - low, 1e-12))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, z: int) -> np.ndarray:
        return self.levels(self._array[z])

    def along(self, axis: int, index: int) -> np.ndarray:
        """The slice ``index`` along array axis ``axis`` (1: a row ``(Z, W[, C])``, 2: a column ``(Z, H[, C])``)."""
        return self.levels(np.take(self._array, index, axis=axis))

    def constant_value(self) -> float | None:
        """The one level every slice's every pixel has (a volume blank as the model sees it), else None; slices
        are made in turn until two levels differ (usually the first few)."""
        found: float | None = None
        for z in range(len(self)):
            value = constant_value(self[z])
            if value is None or (found is not None and value != found):
                return None
            found = value
        return found

    def levels(self, part: np.ndarray) -> np.ndarray:
        """``part`` of the image (all of it, or a slice) as 8-bit levels, float32."""
        shown = np.asarray(self._map(part), dtype=np.float64)
        if self._unit:
            shown = np.clip(shown, 0.0, 1.0) * 255.0
        elif self._rescale is not None:
            shown = (shown - self._rescale[0]) / self._rescale[1] * 255.0
        return np.floor(shown + 1e-6).astype(np.float32)  # the epsilon keeps k/255 * 255 at k despite rounding
