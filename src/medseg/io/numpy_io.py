"""NPY, NPZ (including the MedSAM/LiteMedSAM convention) and MRC arrays.

MedSAM npz files (Ma et al. 2024, the CVPR 2024 "MedSAM on laptop" challenge) hold ``imgs``
(``(y, x, 3)`` for 2D, ``(z, y, x)`` for 3D), ``gts`` (label map, same grid), optionally ``segs``
(a prediction) and ``spacing`` in SimpleITK order ``(sx, sy[, sz])``. medseg also writes ``origin``
and ``direction`` (ITK order) so that its own npz round trips keep the whole geometry; files without
them read with zero origin and identity direction.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError, notice
from medseg.io.image import Geometry, Image
from medseg.io.limits import check_voxels

# Keys tried, in order, when the caller names none: an image first, then label maps.
NPZ_DEFAULT_KEYS = ("imgs", "img", "image", "arr_0", "segs", "gts")


def _check_npy_header(stream: Any, path: Path) -> None:
    """Check the shape an .npy header declares (an npz member: after inflating the header only)."""
    from numpy.lib import format as npy_format

    version = npy_format.read_magic(stream)
    read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
    shape = read_header(stream)[0]
    check_voxels(shape, path)


def read_npy(path: Path) -> Image:
    try:
        with open(path, "rb") as f:
            _check_npy_header(f, path)
        array = np.load(path, allow_pickle=False)
    except MedsegError:
        raise
    except Exception as err:  # numpy raises many types for damaged headers and streams
        raise MedsegError(f"cannot read NPY ({str(err)[:160]})", path) from None
    return _wrap(array, {}, {"format": "npy", "path": str(path)}, path)


def read_npz(path: Path, key: str | None = None) -> Image:
    """Read one array of an npz file: ``key``, or the first of `NPZ_DEFAULT_KEYS` present."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.keys())
            chosen = key or next((k for k in NPZ_DEFAULT_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
            if chosen is None or chosen not in keys:
                wanted = f"key '{key}'" if key else f"one of {', '.join(NPZ_DEFAULT_KEYS)}"
                raise MedsegError(f"npz holds {keys}, not {wanted}", path)
            with zipfile.ZipFile(path) as archive, archive.open(f"{chosen}.npy") as member:
                _check_npy_header(member, path)
            array = npz[chosen]
            geometry_arrays = {k: npz[k] for k in ("spacing", "origin", "direction") if k in keys}
    except MedsegError:
        raise
    except Exception as err:  # zipfile, zlib and numpy raise many types for damaged files
        raise MedsegError(f"cannot read NPZ ({str(err)[:160]})", path) from None
    meta = {"format": "npz", "path": str(path), "npz_key": chosen, "npz_keys": keys}
    return _wrap(array, geometry_arrays, meta, path)


def npz_keys(path: Path) -> list[str]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return list(npz.keys())
    except MedsegError:
        raise
    except Exception as err:  # zipfile, zlib and numpy raise many types for damaged files
        raise MedsegError(f"cannot read NPZ ({str(err)[:160]})", path) from None


def write_npy(image: Image, path: Path) -> None:
    with open(path, "wb") as f:
        np.save(f, image.array)


def write_npz(image: Image, path: Path, key: str) -> None:
    """Write ``key`` (e.g. ``segs`` for a label map, ``imgs`` for an image) and ``spacing`` (ITK order)."""
    with open(path, "wb") as f:
        g = image.geometry
        arrays = {
            "spacing": np.asarray(g.spacing),
            "origin": np.asarray(g.origin),
            "direction": np.asarray(g.direction),
        }
        arrays[key] = image.array
        np.savez_compressed(f, **arrays)  # type: ignore[arg-type]


def read_mrc(path: Path) -> Image:
    """Read an MRC/CCP4 volume (``(z, y, x)``); a voxel size of 0 (unset) reads as 1 mm."""
    import mrcfile

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # mrcfile warns, then raises, on damaged files
            with mrcfile.open(path, header_only=True) as header_only:
                header = header_only.header
                check_voxels((int(header.nx), int(header.ny), int(header.nz)), path)
            mrc_file = mrcfile.open(path)
        with mrc_file as mrc:
            if mrc.data is None:
                raise MedsegError("MRC file has no data block", path)
            array = np.array(mrc.data)
            voxel = mrc.voxel_size
            size = [float(voxel.x), float(voxel.y), float(voxel.z)]
    except MedsegError:
        raise
    except Exception as err:  # mrcfile raises ValueError, OSError, EOFError... for damaged files
        raise MedsegError(f"cannot read MRC ({str(err)[:160]})", path) from None
    ndim = 2 if array.ndim == 2 else 3
    spacing = [s if s > 0 else 1.0 for s in size[:ndim]]
    meta = {"format": "mrc", "path": str(path), "spacing_from_file": any(s > 0 for s in size)}
    return _wrap(array, {"spacing": np.asarray(spacing)}, meta, path)


def _wrap(array: np.ndarray, geometry_arrays: dict[str, Any], meta: dict[str, Any], path: Path) -> Image:
    if array.dtype.kind not in "biuf":
        raise MedsegError(f"unsupported array dtype {array.dtype}", path)
    if array.ndim == 3 and array.shape[-1] == 1 and np.size(geometry_arrays.get("spacing", ())) != 3:
        notice(f"array of shape {array.shape} read as 2D {array.shape[:2]} (a trailing axis of size 1)", path)
        array = array[..., 0]
    channels = 3 if array.ndim == 3 and array.shape[-1] == 3 and array.shape[0] > 3 else 1
    spatial = array.ndim - (1 if channels > 1 else 0)
    if spatial not in (2, 3):
        raise MedsegError(f"{spatial}D array of shape {array.shape} is not a 2D or 3D image", path)
    identity = Geometry.identity(spatial)
    values = {}
    for name, default in (
        ("spacing", identity.spacing),
        ("origin", identity.origin),
        ("direction", identity.direction),
    ):
        given = geometry_arrays.get(name)
        try:
            value = default if given is None else tuple(float(v) for v in np.ravel(given))
        except (TypeError, ValueError):
            raise MedsegError(f"{name} in the file is not numeric ({given!r:.60})", path) from None
        if len(value) != len(default) or not all(np.isfinite(value)):
            raise MedsegError(f"{name} {value} does not fit a {spatial}D array of shape {array.shape}", path)
        values[name] = value
    if min(values["spacing"]) <= 0:
        raise MedsegError(f"spacing {values['spacing']} must be positive", path)
    geometry = Geometry(values["spacing"], values["origin"], values["direction"])
    return Image(array, geometry, channels=channels, meta=meta)
