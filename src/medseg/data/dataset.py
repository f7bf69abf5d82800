"""Labelled datasets on disk: the nnU-Net v2 raw layout and plain ``images/`` + ``masks/`` folders.

nnU-Net v2 raw layout (Isensee et al. 2021; nnU-Net ``dataset_format.md``)::

    DIR/dataset.json                      labels {name: value}, channel_names, file_ending, numTraining
    DIR/imagesTr/<case>_0000<file_ending>  one file per channel (_0000, _0001, ...); an RGB PNG is one
                                           file holding three channels
    DIR/labelsTr/<case><file_ending>

Folder pairs::

    DIR/images/<name>.<ext>   DIR/masks/<name>.<ext>   (``labels/`` instead of ``masks/`` also works; a
                                                         mask may carry a _mask/_seg/_label suffix)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError
from medseg.io.formats import is_image_file, split_extension

_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_MASK_SUFFIXES = ("", "_mask", "_seg", "_label", "_labels", "_gt")


@dataclass(frozen=True)
class Case:
    """One labelled case: its channel files in channel order and its label file (None if missing)."""

    name: str
    images: tuple[Path, ...]
    label: Path | None


@dataclass
class Dataset:
    """A dataset's cases and declared properties (from ``dataset.json`` where there is one)."""

    root: Path
    layout: str  # "nnunet" or "folders"
    cases: list[Case]
    labels: dict[str, int] = field(default_factory=dict)  # {name: value}, background included
    channel_names: dict[str, str] = field(default_factory=dict)
    modality: str = ""
    name: str = ""
    declared_cases: int | None = None
    orphan_labels: list[Path] = field(default_factory=list)  # label files without an image
    info: dict[str, Any] = field(default_factory=dict)  # the whole dataset.json

    def label_names(self) -> dict[int, str]:
        """{value: name} of the declared labels (empty when nothing is declared)."""
        return {int(v): k for k, v in self.labels.items()}

    def foreground_labels(self) -> list[int]:
        return sorted(v for v in self.label_names() if v != 0)


def open_dataset(root: str | Path) -> Dataset:
    """Read a dataset folder in either layout.

    Raises:
        MedsegError: the folder is missing, holds neither layout, or its dataset.json is invalid.
    """
    path = Path(root)
    if not path.is_dir():
        raise MedsegError("no such dataset folder", path)
    info = read_dataset_json(path / "dataset.json") if (path / "dataset.json").exists() else {}
    if (path / "imagesTr").is_dir():
        dataset = _open_nnunet(path, info)
    elif (path / "images").is_dir():
        dataset = _open_folders(path)
    else:
        raise MedsegError("not a dataset: expected imagesTr/ + labelsTr/ (nnU-Net) or images/ + masks/", path)
    dataset.info = info
    dataset.name = str(info.get("name", path.name))
    dataset.modality = str(info.get("modality", ""))
    dataset.labels = {str(k): _label_value(v, path) for k, v in info.get("labels", {}).items()}
    dataset.channel_names = {str(k): str(v) for k, v in info.get("channel_names", {}).items()}
    dataset.declared_cases = info.get("numTraining")
    return dataset


def read_dataset_json(path: Path) -> dict[str, Any]:
    """Parse ``dataset.json``; a clear error when it is not a JSON object."""
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MedsegError(f"invalid dataset.json ({err})", path) from None
    if not isinstance(info, dict):
        raise MedsegError("dataset.json must hold a JSON object", path)
    if not isinstance(info.get("labels", {}), dict):
        raise MedsegError("dataset.json 'labels' must map names to values", path)
    return info


def find_dataset_json(folder: Path) -> Path | None:
    """The ``dataset.json`` of a label or image folder: in it, or in its parent (nnU-Net layout)."""
    for candidate in (folder / "dataset.json", folder.parent / "dataset.json"):
        if candidate.is_file():
            return candidate
    return None


def _label_value(value: Any, root: Path) -> int:
    # nnU-Net region-based labels are lists of values; medseg reads plain integer labels.
    if isinstance(value, bool) or not isinstance(value, int):
        raise MedsegError(f"dataset.json label value {value!r} is not an integer", root / "dataset.json")
    return value


def _files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if is_image_file(p) or (p.is_dir() and not p.name.startswith(".")))


def _open_nnunet(root: Path, info: dict[str, Any]) -> Dataset:
    ending = str(info.get("file_ending", ""))
    channels: dict[str, dict[int, Path]] = {}
    for f in _files(root / "imagesTr"):
        stem = f.name[: -len(ending)] if ending and f.name.endswith(ending) else split_extension(f)[0]
        match = _CHANNEL_SUFFIX.match(stem)
        if match is None:
            raise MedsegError("image name lacks the _0000 channel suffix of the nnU-Net layout", f)
        channels.setdefault(match["case"], {})[int(match["channel"])] = f
    labels = {split_extension(f)[0]: f for f in _files(root / "labelsTr")}
    cases = [
        Case(name, tuple(files[k] for k in sorted(files)), labels.get(name)) for name, files in sorted(channels.items())
    ]
    orphans = [f for name, f in sorted(labels.items()) if name not in channels]
    return Dataset(root=root, layout="nnunet", cases=cases, orphan_labels=orphans)


def _open_folders(root: Path) -> Dataset:
    mask_dir = next((root / d for d in ("masks", "labels") if (root / d).is_dir()), root / "masks")
    masks = {split_extension(f)[0]: f for f in _files(mask_dir)}
    cases, used = [], set()
    for f in _files(root / "images"):
        stem = split_extension(f)[0]
        key = next((stem + s for s in _MASK_SUFFIXES if stem + s in masks), None)
        if key is not None:
            used.add(key)
        cases.append(Case(stem, (f,), masks.get(key) if key else None))
    orphans = [f for k, f in sorted(masks.items()) if k not in used]
    return Dataset(root=root, layout="folders", cases=cases, orphan_labels=orphans)
