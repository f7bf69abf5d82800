"""Reading one case of a dataset: its channel files stacked into one multi-channel image, and its label map."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg.data.dataset import Case
from medseg.data.label_files import read_label
from medseg.errors import MedsegError
from medseg.io import Image, as_label_array, load


def load_channels(files: Sequence[str | Path], series: str | None = None, frame: int | None = None) -> Image:
    """Stack the channel files of one case (``_0000``, ``_0001``, ...) into one image, channels last.

    An RGB file contributes three channels. Geometry and meta come from the first file; ``series`` picks one
    series of a DICOM folder holding several, ``frame`` one volume of 4D files (`medseg.io.load`).

    Raises:
        MedsegError: a file is unreadable or the files are on different grids.
    """
    images = [load(path, series=series, frame=frame) for path in files]
    first = images[0]
    if len(images) == 1:
        return first
    arrays = []
    for image, path in zip(images, files, strict=True):
        if image.shape != first.shape:
            raise MedsegError(f"channel file has shape {image.shape}, the first channel {first.shape}", path)
        arrays.append(image.array if image.channels > 1 else image.array[..., None])
    stacked = np.concatenate([a.astype(np.float32) for a in arrays], axis=-1)
    return first.with_array(stacked, channels=stacked.shape[-1], path=str(files[0]))


def load_case(case: Case) -> tuple[Image, np.ndarray | None]:
    """``(image, label)`` of a case: all channels in one `Image` and the integer label map (None if unlabelled).

    Raises:
        MedsegError: unreadable files, or a label map on another grid than the image (shape, or spacing, origin
            or direction beyond `medseg.io.image.GEOMETRY_ATOL`, as `medseg check` compares them).
    """
    image = load_channels(case.images)
    if case.label is None:
        return image, None
    label_image = read_label(case.label, image, case.declared_labels)
    label = as_label_array(label_image)
    if label.shape != image.shape:
        raise MedsegError(f"label map has shape {label.shape}, the image {image.shape}", case.label)
    if not image.geometry.matches(label_image.geometry):
        difference = label_image.geometry.describe_difference(image.geometry)
        raise MedsegError(f"label map's geometry differs from the image's: {difference}", case.label)
    return image, label
