"""Limits on what a file may make medseg allocate: sizes declared in headers are checked before any read.

A header is a promise a file's author makes, and a hostile (or damaged) one can promise anything: a 1 KB
NIfTI may declare 10^9 voxels, a DICOM slice Rows = Columns = 60000, a small gzip may inflate to gigabytes.
Every reader calls `check_voxels` with the declared size before it allocates; compressed streams are inflated
through `read_capped`. The limit is ``MEDSEG_MAX_VOXELS`` when set, else `default_max_voxels`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from medseg.errors import MedsegError

ENV_MAX_VOXELS = "MEDSEG_MAX_VOXELS"
# Bytes of memory a voxel may cost along a pipeline: the array as read, a float32 copy, resampled and
# normalised copies, per-class probabilities. The default limit is the machine's memory over this.
BYTES_PER_VOXEL_BUDGET = 32
# When the machine's memory cannot be read.
_FALLBACK_MAX_VOXELS = 512 * 1024 * 1024


def default_max_voxels() -> int:
    """The machine's physical memory (bytes) over `BYTES_PER_VOXEL_BUDGET`."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX
        return _FALLBACK_MAX_VOXELS
    return max(1, int(memory) // BYTES_PER_VOXEL_BUDGET)


def max_voxels() -> int:
    """The voxel limit: ``MEDSEG_MAX_VOXELS`` (a positive integer; ``1e9`` and ``2_000_000`` are accepted) or
    `default_max_voxels`.

    Raises:
        MedsegError: ``MEDSEG_MAX_VOXELS`` is set but not a positive number.
    """
    text = os.environ.get(ENV_MAX_VOXELS, "").strip()
    if not text:
        return default_max_voxels()
    try:
        value = int(float(text.replace("_", "")))
    except ValueError:
        value = 0
    if value <= 0:
        raise MedsegError(f"{ENV_MAX_VOXELS}={text!r} is not a positive number of voxels")
    return value


def check_voxels(size: tuple[int, ...] | list[int], path: str | Path | None, what: str = "header") -> int:
    """Raise unless the ``size`` a file declares (any axis order; channels and frames included) is within
    `max_voxels`; return the voxel count.

    Raises:
        MedsegError: a negative size, or more voxels than the limit, naming ``path``.
    """
    dims = [int(s) for s in size]
    if any(d < 0 for d in dims):
        raise MedsegError(f"{what} declares a negative size {tuple(dims)}", path)
    count = 1
    for d in dims:
        count *= d
    limit = max_voxels()
    if count > limit:
        shown = " x ".join(str(d) for d in dims)
        raise MedsegError(
            f"{what} declares {shown} = {count:.3g} voxels, more than the limit of {limit:.3g} "
            f"(set {ENV_MAX_VOXELS} to allow more)",
            path,
        )
    return count


def read_capped(stream: BinaryIO, cap: int, path: str | Path | None, what: str) -> bytes:
    """Read ``stream`` to its end, refusing (without holding more than ``cap`` bytes) when it is longer.

    Raises:
        MedsegError: the stream holds more than ``cap`` bytes.
    """
    data = stream.read(cap + 1)
    if len(data) > cap:
        raise MedsegError(f"{what} inflates to more than {cap:.3g} bytes, more than it can hold", path)
    return data
