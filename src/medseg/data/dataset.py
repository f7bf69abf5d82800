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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError
from medseg.io.formats import is_image_file, split_channel, split_extension
from medseg.io.paths import link_problem

_MASK_SUFFIXES = ("", "_mask", "_seg", "_label", "_labels", "_gt")


@dataclass(frozen=True)
class Case:
    """One labelled case: its channel files in channel order and its label file (None if missing)."""

    name: str
    images: tuple[Path, ...]
    label: Path | None
    declared_labels: tuple[int, ...] = ()  # the dataset's label values (dataset.json), for reading the label


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
    layout_problems: list[tuple[Path, str]] = field(default_factory=list)  # misnamed or duplicate files
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
        raise MedsegError(link_problem(path) or "no such dataset folder", path)
    info = read_dataset_json(path / "dataset.json") if (path / "dataset.json").exists() else {}
    if (path / "imagesTr").is_dir():
        dataset = _open_nnunet(path, info)
    elif (path / "images").is_dir():
        dataset = _open_folders(path)
    else:
        raise MedsegError("not a dataset: expected imagesTr/ + labelsTr/ (nnU-Net) or images/ + masks/", path)
    dataset.info = info
    dataset.name = str(info.get("name", path.resolve().name))
    dataset.modality = str(info.get("modality", ""))
    dataset.labels = {name: value for value, name in label_names_of(info).items()}
    declared = tuple(sorted(dataset.labels.values()))
    dataset.cases = [replace(case, declared_labels=declared) for case in dataset.cases]
    dataset.channel_names = {str(k): str(v) for k, v in info.get("channel_names", {}).items()}
    dataset.declared_cases = info.get("numTraining")
    return dataset


def read_dataset_json(path: Path) -> dict[str, Any]:
    """Parse ``dataset.json``; a clear error when it is not a JSON object."""
    try:
        info = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MedsegError(f"invalid dataset.json ({err})", path) from None
    if not isinstance(info, dict):
        raise MedsegError("dataset.json must hold a JSON object", path)
    if not isinstance(info.get("labels", {}), dict):
        raise MedsegError("dataset.json 'labels' must map names to values", path)
    for value in info.get("labels", {}).values():
        # nnU-Net region-based labels are lists of values; medseg reads plain integer labels.
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MedsegError(f"dataset.json label value {value!r} is not a non-negative integer", path)
    if not isinstance(info.get("channel_names", {}), dict):
        raise MedsegError("dataset.json 'channel_names' must map channel numbers to names", path)
    count = info.get("numTraining")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int)):
        raise MedsegError(f"dataset.json 'numTraining' must be an integer, not {count!r}", path)
    if not isinstance(info.get("file_ending", ""), str):
        raise MedsegError("dataset.json 'file_ending' must be a string such as '.nii.gz'", path)
    return info


def label_names_of(info: dict[str, Any]) -> dict[int, str]:
    """{value: name} of a validated dataset.json (`read_dataset_json`)."""
    return {int(v): str(k) for k, v in info.get("labels", {}).items()}


def find_dataset_json(folder: Path) -> Path | None:
    """The ``dataset.json`` of a label or image folder: in it, or in its parent (nnU-Net layout)."""
    for candidate in (folder / "dataset.json", folder.parent / "dataset.json"):
        if candidate.is_file():
            return candidate
    return None


def _files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    try:
        return sorted(p for p in folder.iterdir() if is_image_file(p) or (p.is_dir() and not p.name.startswith(".")))
    except OSError as err:
        raise MedsegError(f"cannot list folder ({err.strerror or err})", folder) from None


def _open_nnunet(root: Path, info: dict[str, Any]) -> Dataset:
    ending = str(info.get("file_ending", ""))
    channels: dict[str, dict[int, Path]] = {}
    problems: list[tuple[Path, str]] = []
    for f in _files(root / "imagesTr"):
        if ending and not f.name.endswith(ending):
            problems.append((f, f"file does not end with dataset.json's file_ending '{ending}'"))
            continue
        stem = f.name[: -len(ending)] if ending else split_extension(f)[0]
        split = split_channel(stem)
        if split is None:
            raise MedsegError("image name lacks the _0000 channel suffix of the nnU-Net layout", f)
        case, channel = split
        found = channels.setdefault(case, {})
        if channel in found:
            problems.append((f, f"second file for channel {stem[-4:]} (also {found[channel].name})"))
        found[channel] = f
    for name, found in channels.items():
        if sorted(found) != list(range(len(found))):
            numbers = ", ".join(f"_{k:04d}" for k in sorted(found))
            problems.append((found[min(found)], f"case {name} has channels {numbers}; they must run from _0000 up"))
    labels = {}
    for f in _files(root / "labelsTr"):
        if ending and not f.name.endswith(ending):
            problems.append((f, f"file does not end with dataset.json's file_ending '{ending}'"))
        else:
            labels[f.name[: -len(ending)] if ending else split_extension(f)[0]] = f
    cases = [
        Case(name, tuple(files[k] for k in sorted(files)), labels.get(name)) for name, files in sorted(channels.items())
    ]
    orphans = [f for name, f in sorted(labels.items()) if name not in channels]
    return Dataset(root=root, layout="nnunet", cases=cases, orphan_labels=orphans, layout_problems=problems)


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
