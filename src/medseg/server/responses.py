"""How the workbench's HTTP API answers and whom it answers: NIfTI bytes of images and label maps, the JSON mask
encoding (zlib + base64 of the uint8 label map), and the cross-site checks (a foreign ``Host`` without a token, a
foreign ``Origin`` on a write)."""

from __future__ import annotations

import base64
import re
import tempfile
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from fastapi import Request
from fastapi.responses import Response

from medseg.io import Image, save
from medseg.server.sessions import Session

NIFTI = "application/octet-stream"

_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


def cross_site(request: Request, has_token: bool) -> str | None:
    """Why a request must be refused as cross-site, or None: without a token, a ``Host`` that is not loopback
    (a DNS-rebinding page); always, a state-changing request whose ``Origin`` is not the server's own."""
    host = request.headers.get("host", "")
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if not has_token and name not in _LOOPBACK_NAMES:
        return f"requests must address the server as 127.0.0.1 or localhost, not {host[:80]!r}"
    origin = request.headers.get("origin")
    writes = request.method not in ("GET", "HEAD", "OPTIONS")
    if writes and origin is not None and origin != "null" and origin.split("://", 1)[-1] != host:
        return f"cross-site request from {origin[:80]!r} refused"
    return None


_RGB24 = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])


def nifti_bytes(image: Image, rgb24: bool = False) -> bytes:
    """``.nii.gz`` bytes of ``image`` in its geometry; with ``rgb24``, 8-bit RGB as NIfTI's RGB24 datatype (what
    viewers show in colour; readers such as SimpleITK then see a single-slice volume) instead of ITK's vector."""
    with tempfile.TemporaryDirectory(prefix="medseg-serve-") as folder:
        path = save(image, Path(folder) / "image.nii.gz")
        if rgb24 and image.channels == 3 and image.array.dtype == np.uint8:
            vector = nib.Nifti1Image.from_filename(path)  # x, y[, z], 1, 3: ITK's vector layout
            header: Any = vector.header
            data = np.asarray(vector.dataobj)
            rgb = np.ascontiguousarray(data.reshape(*data.shape[:3], 3)).view(_RGB24)[..., 0]
            colour = nib.Nifti1Image(rgb, None)
            colour.header.set_qform(*header.get_qform(coded=True))
            colour.header.set_sform(*header.get_sform(coded=True))
            colour.header.set_xyzt_units(*header.get_xyzt_units())
            nib.save(colour, path)
        return path.read_bytes()


def nifti_response(image: Image, filename: str, headers: dict[str, str] | None = None, rgb24: bool = False) -> Response:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", filename)
    extra = {"Content-Disposition": f'attachment; filename="{safe}"', **(headers or {})}
    return Response(nifti_bytes(image, rgb24), media_type=NIFTI, headers=extra)


def mask_response(session: Session, labels: np.ndarray, format: str) -> Any:
    if format == "nifti":
        return nifti_response(session.image.with_array(labels), f"{session.image_id}_labels.nii.gz")
    array = np.ascontiguousarray(labels, dtype=np.uint8)
    return {
        "session_id": session.id,
        "image_id": session.image_id,
        "shape": list(array.shape),
        "dtype": "uint8",
        "encoding": "zlib+base64",
        "labels": base64.b64encode(zlib.compress(array.tobytes(), 1)).decode("ascii"),
        "interactions": session.interactions,
    }


def decode_labels(mask: dict[str, Any]) -> np.ndarray:
    """A mask response's label map as a ``uint8`` array of its ``shape`` (the inverse of the encoding)."""
    raw = zlib.decompress(base64.b64decode(mask["labels"]))
    return np.frombuffer(raw, np.uint8).reshape(mask["shape"])
