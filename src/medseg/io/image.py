"""The `Image`: a numpy array that carries its geometry (spacing, origin, direction) and source.

Conventions (the same as SimpleITK's numpy view, and nnU-Net's):

- ``Image.array`` has spatial axes in numpy order, ``(z, y, x)`` in 3D and ``(y, x)`` in 2D, then a
  trailing channel axis when ``channels > 1`` (RGB images: ``(y, x, 3)``).
- `Geometry` is kept in physical (ITK / DICOM) order: ``spacing`` ``(sx, sy[, sz])`` in mm, ``origin``
  the LPS position in mm of the first voxel's centre, ``direction`` the row-major D x D cosine matrix
  whose column ``j`` is the physical direction of ITK index axis ``j`` (x first).
- ``Image.spacing`` is the spacing per *array* axis, ``(sz, sy, sx)``: the order computations need.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError, notice

# Geometry read back from a file is compared with this tolerance (mm and direction cosines):
# NIfTI stores geometry in float32, so exact equality fails across formats.
GEOMETRY_ATOL = 1e-4
# An integer single-channel image with at most this many distinct values is taken for a label map.
MAX_LABELS = 64
# Float label values this close to an integer are float rounding (resampling, a float32 round trip) and are
# rounded, with a notice; farther ones make the file an image, not a label map.
LABEL_ROUNDING_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Geometry:
    """Physical placement of a voxel grid, in ITK order (x first); see the module docstring."""

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def identity(cls, ndim: int) -> Geometry:
        """Unit spacing, zero origin, identity direction (what PNG and NPY files imply)."""
        return cls((1.0,) * ndim, (0.0,) * ndim, tuple(np.eye(ndim).ravel().tolist()))

    @property
    def ndim(self) -> int:
        return len(self.spacing)

    def direction_matrix(self) -> np.ndarray:
        """The D x D direction matrix (columns: ITK index axes x, y, z)."""
        return np.asarray(self.direction, dtype=float).reshape(self.ndim, self.ndim)

    def affine(self) -> np.ndarray:
        """(D+1) x (D+1) matrix from a numpy index ``(z, y, x, 1)`` to an LPS point in mm."""
        d = self.ndim
        itk_affine = self.direction_matrix() * np.asarray(self.spacing)[None, :]
        out = np.eye(d + 1)
        out[:d, :d] = itk_affine[:, ::-1]  # numpy axis k is ITK axis d-1-k
        out[:d, d] = self.origin
        return out

    def orientation(self) -> str:
        """Three-letter (two in 2D) code of the axis each ITK index axis points *towards*, LPS frame.

        "LPS" means x runs to the patient's left, y to posterior, z to superior (DICOM's frame);
        NIfTI's RAS+ images read as "LPS"-coded too since both frames are converted on reading.
        """
        letters = [("L", "R"), ("P", "A"), ("S", "I")]
        m = self.direction_matrix()
        code = ""
        for j in range(self.ndim):
            axis = int(np.argmax(np.abs(m[:, j])))
            positive, negative = letters[axis] if axis < 3 else ("?", "?")
            code += positive if m[axis, j] > 0 else negative
        return code

    def matches(self, other: Geometry, atol: float = GEOMETRY_ATOL) -> bool:
        """True when both grids place voxels at the same physical points (within ``atol``)."""
        if self.ndim != other.ndim:
            return False
        return bool(
            np.allclose(self.spacing, other.spacing, atol=atol, rtol=1e-6)
            and np.allclose(self.origin, other.origin, atol=atol, rtol=1e-6)
            and np.allclose(self.direction, other.direction, atol=atol)
        )

    def describe_difference(self, other: Geometry) -> str:
        """A short human-readable reason why two geometries differ ('' when they match)."""
        if self.ndim != other.ndim:
            return f"{self.ndim}D vs {other.ndim}D"
        for name in ("spacing", "origin", "direction"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if not np.allclose(mine, theirs, atol=GEOMETRY_ATOL, rtol=1e-6):
                for digits in (4, 7, 10, 17):  # enough digits to show the difference
                    shown = [", ".join(f"{x:.{digits}g}" for x in v) for v in (mine, theirs)]
                    if shown[0] != shown[1]:
                        break
                return f"{name} ({shown[0]}) vs ({shown[1]})"
        return ""


@dataclass(eq=False)
class Image:
    """An array with its geometry and where it came from.

    Args:
        array: ``(*spatial)`` or ``(*spatial, C)`` with spatial axes in numpy order ``(z, y, x)``.
        geometry: physical placement, ITK order; defaults to `Geometry.identity`.
        channels: number of channels; when > 1 the last array axis holds them.
        meta: source metadata (``format``, ``path``, DICOM tags, ...); copied, never shared.

    Raises:
        MedsegError: the array is empty, not 2D/3D, or disagrees with the geometry's dimension.
    """

    array: np.ndarray
    geometry: Geometry = field(default=None)  # type: ignore[assignment]
    channels: int = 1
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        spatial_ndim = self.array.ndim - (1 if self.channels > 1 else 0)
        where = self.meta.get("path")
        if self.array.size == 0:
            raise MedsegError(f"empty image (shape {self.array.shape})", where)
        if spatial_ndim not in (2, 3):
            extra = " (4D/time series are not supported; split channels into separate files)"
            raise MedsegError(f"{spatial_ndim}D image{extra if spatial_ndim > 3 else ''}", where)
        if self.channels > 1 and self.array.shape[-1] != self.channels:
            raise MedsegError(f"expected {self.channels} channels on the last axis, got {self.array.shape}")
        if self.geometry is None:
            self.geometry = Geometry.identity(spatial_ndim)
        if self.geometry.ndim != spatial_ndim:
            raise MedsegError(f"array is {spatial_ndim}D but geometry is {self.geometry.ndim}D", where)
        self.meta = dict(self.meta)

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return self.geometry.ndim

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape in numpy order ``(z, y, x)`` / ``(y, x)``, without channels."""
        return tuple(self.array.shape[: self.ndim])

    @property
    def spacing(self) -> tuple[float, ...]:
        """Spacing in mm per array axis, numpy order ``(sz, sy, sx)``."""
        return tuple(reversed(self.geometry.spacing))

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm^3 (area in mm^2 for 2D images)."""
        return float(np.prod(self.geometry.spacing))

    def with_array(self, array: np.ndarray, channels: int = 1, **meta: Any) -> Image:
        """A new image on the same grid (e.g. a label map for this image); ``meta`` entries override."""
        new_meta = {k: v for k, v in self.meta.items() if k != "path"}
        new_meta.update(meta)
        return replace(self, array=array, channels=channels, meta=new_meta)

    def is_label_map(self) -> bool:
        """True when the array looks like a label map: one channel of non-negative integers with at
        most `MAX_LABELS` distinct values (a grey photograph or scan has more)."""
        if self.channels != 1 or self.array.dtype.kind not in "biu":
            return False
        values = np.unique(self.array)
        return len(values) <= MAX_LABELS and values[0] >= 0


def as_label_array(image: Image) -> np.ndarray:
    """The integer label map of a single-channel image.

    Float arrays are accepted when every value is within `LABEL_ROUNDING_TOLERANCE` of an integer (NIfTI
    labels are often stored as float); values that are not exact integers are rounded, with a notice.

    Raises:
        MedsegError: several channels, NaN/inf, non-integer or negative values.
    """
    where = image.meta.get("path")
    if image.channels > 1:
        raise MedsegError(f"a label map must have one channel, this one has {image.channels}", where)
    return label_array(image.array, where)


def label_array(array: np.ndarray, where: str | Path | None = None) -> np.ndarray:
    """``array`` as an integer label map (bool -> uint8; floats within `LABEL_ROUNDING_TOLERANCE` of integers ->
    rounded int64, with a `medseg.errors.MedsegNotice` when any was not exact); ``where`` names it in errors.

    Raises:
        MedsegError: not an array, NaN/inf, values farther from integers than the tolerance, negative values or a
            non-numeric dtype.
    """
    if not isinstance(array, np.ndarray):
        raise MedsegError(f"a label map must be a numpy array, not {type(array).__name__}", where)
    if array.dtype.kind == "b":
        return array.astype(np.uint8)
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            raise MedsegError(f"label map holds {int((~finite).sum())} NaN/inf values", where)
        rounded = np.round(array)
        if not np.array_equal(array, rounded):
            off = float(np.max(np.abs(array - rounded)))
            if off > LABEL_ROUNDING_TOLERANCE:
                raise MedsegError(
                    f"label map holds non-integer values (up to {off:.3g} from an integer; is this an image, "
                    "not a label map?)",
                    where,
                )
            notice(f"float label values within {off:.2g} of integers were rounded", where)
        array = rounded.astype(np.int64)
    elif array.dtype.kind not in "iu":
        raise MedsegError(f"label map has unsupported dtype {array.dtype}", where)
    if array.dtype.kind == "i" and array.min() < 0:
        raise MedsegError(f"label map holds negative values (min {array.min()})", where)
    return array
