"""2D raster images: PNG, JPEG, BMP, GIF through Pillow; TIFF through tifffile.

Grey images give ``(y, x)``, RGB ``(y, x, 3)`` (alpha dropped, ``meta["alpha"]`` says whether it was
opaque), palette PNGs their palette *indices* (the usual way label maps are stored as palette images).
Spacing is 1 mm: these formats carry no trustworthy physical spacing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError
from medseg.io.image import Image
from medseg.io.limits import check_voxels


def read(path: Path, fmt: str) -> Image:
    """Read a 2D raster file (a multi-page TIFF becomes a 3D ``(z, y, x)`` stack)."""
    meta: dict[str, Any] = {"format": fmt, "path": str(path)}
    if fmt == "tiff":
        array = _read_tiff(path)
    else:
        array, meta["mode"] = _read_pillow(path)
    if array.ndim == 3 and array.shape[-1] in (2, 4) and fmt != "tiff":
        alpha = array[..., -1]
        opaque = int(np.iinfo(alpha.dtype).max) if alpha.dtype.kind in "iu" else 1
        seen = int(np.count_nonzero(alpha != opaque))
        meta["alpha"] = "dropped; it was opaque" if not seen else f"dropped; {seen} pixels were not opaque"
        array = array[..., : array.shape[-1] - 1]
    channels = 1
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] == 3 and fmt != "tiff":
        channels = 3
    elif array.ndim == 3 and fmt == "tiff" and array.shape[-1] in (3, 4) and array.shape[0] > 4:
        channels, array = 3, array[..., :3]  # RGB(A) TIFF, not a stack of 3 slices
    return Image(np.ascontiguousarray(array), channels=channels, meta=meta)


def write(image: Image, path: Path, fmt: str) -> None:
    """Write a 2D grey/RGB image or label map.

    Raises:
        MedsegError: 3D data, or values a PNG cannot hold (negative, float, > 65535).
    """
    if image.ndim != 2 and fmt != "tiff":
        raise MedsegError(f"cannot write a {image.ndim}D image as {fmt.upper()} (use .nii.gz)", path)
    array = image.array
    if fmt == "tiff":
        import tifffile

        tifffile.imwrite(path, array, photometric="rgb" if image.channels == 3 else "minisblack")
        return
    from PIL import Image as PILImage

    if array.dtype.kind == "b":
        array = array.astype(np.uint8)
    if array.dtype.kind == "f" or (array.dtype.kind in "iu" and (array.min() < 0 or array.max() > 65535)):
        raise MedsegError(f"values of dtype {array.dtype} in [{array.min()}, {array.max()}] do not fit {fmt}", path)
    if image.channels > 1 and array.max() > 255:
        raise MedsegError(f"{fmt.upper()} holds 8-bit colour only; max here is {array.max()}", path)
    if image.channels == 1 and array.max() > 255:
        if fmt != "png":
            raise MedsegError(f"{fmt.upper()} holds 8-bit values only; max here is {array.max()}", path)
        pil = PILImage.fromarray(array.astype(np.uint16))
    else:
        pil = PILImage.fromarray(array.astype(np.uint8))
    if fmt == "gif" and image.channels > 1:
        raise MedsegError("GIF stores palette indices, not RGB colour; use .png", path)
    save_format = {"jpeg": "JPEG", "png": "PNG", "bmp": "BMP", "gif": "GIF"}[fmt]
    pil.save(path, format=save_format)


def _read_pillow(path: Path) -> tuple[np.ndarray, str]:
    import warnings

    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # medseg's own limit (checked below, before decoding) replaces Pillow's bomb warning; Pillow's
            # DecompressionBombError (twice its own limit) is still turned into the one-line error
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
            pil_file = PILImage.open(path)
        with pil_file as pil:
            mode = pil.mode
            check_voxels((*pil.size, len(pil.getbands())), path)
            if getattr(pil, "n_frames", 1) > 1:
                raise MedsegError(f"animated/multi-frame {pil.format} is not supported", path)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
                pil.load()
            if mode in ("P", "PA"):
                array = np.asarray(pil.convert("P") if mode == "PA" else pil)  # palette indices
            elif mode in ("CMYK", "YCbCr", "HSV", "LAB"):
                array = np.asarray(pil.convert("RGB"))
            elif mode == "1":
                array = np.asarray(pil, dtype=np.uint8)
            elif mode.startswith("I;16"):
                array = np.asarray(pil).astype(np.uint16)
            else:
                array = np.asarray(pil)
    except PILImage.DecompressionBombError as err:
        raise MedsegError(f"refused as a decompression bomb ({str(err).split(', could')[0][:160]})", path) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise MedsegError(f"cannot read image ({err.__class__.__name__}: {str(err)[:160]})", path) from None
    return array, mode


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            check_voxels(tif.series[0].shape if tif.series else (), path)
            return np.asarray(tif.asarray())
    except MedsegError:
        raise
    except Exception as err:  # tifffile raises many exception types for broken files
        raise MedsegError(f"cannot read TIFF ({err.__class__.__name__}: {str(err)[:160]})", path) from None
