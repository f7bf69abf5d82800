"""A workspace: a folder of images to annotate, their finished label maps in ``labelsTr/``, medseg's state in
``.medseg/`` (drafts, the specialist's runs). A DICOM series' finished label map is also written as a DICOM-SEG
referencing the series, ``dicom-seg/<id>.dcm`` (``labelsTr/`` keeps the NIfTI label map that training reads;
nnU-Net's ``labelsTr`` holds one file ending).

Layouts: images directly in the folder (files in any format medseg reads, DICOM series as sub-folders), or
nnU-Net's raw layout (``imagesTr/`` beside ``labelsTr/``). An image's id is its case name (``_0000`` dropped).
The task's labels come from ``dataset.json`` (nnU-Net's ``labels``) when the folder has one, else
``{"background": 0, "foreground": 1}``. Nothing outside the folder is ever read or written: ids are looked up in
the listing (never joined to paths), and files or series that resolve outside the folder (symlinks) are not listed.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.data.cases import load_channels
from medseg.engine.run_files import write_json
from medseg.errors import MedsegError
from medseg.inference.folders import cases_of
from medseg.io import Image, label_path_for, load, save, save_dicom_seg
from medseg.io.formats import is_image_file, split_extension

LABELS_DIR = "labelsTr"
STATE_DIR = ".medseg"
DICOM_SEG_DIR = "dicom-seg"
DEFAULT_LABELS = {"background": 0, "foreground": 1}


class UnknownImage(MedsegError):
    """An image id that the workspace does not list (HTTP 404)."""


@dataclass(frozen=True)
class ImageEntry:
    """One image of the workspace: ``id`` and its files (channels, or one DICOM series folder)."""

    id: str
    files: tuple[Path, ...]


class Workspace:
    """The images of ``root`` and their annotations; safe to share between threads.

    ``dicom_seg``: a DICOM series' finished label map is also saved as a DICOM-SEG (`dicom_seg_path`).

    Raises:
        MedsegError: ``root`` is not a folder, or its ``dataset.json`` is unreadable.
    """

    def __init__(self, root: str | Path, cache_images: int = 8, dicom_seg: bool = True) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise MedsegError("not a folder (a workspace is a folder of images)" if self.root.exists()
                              else "no such workspace folder", root)  # fmt: skip
        images_dir = self.root / "imagesTr"
        self.images_dir = images_dir if images_dir.is_dir() else self.root
        self.labels_dir = self.root / LABELS_DIR
        self.state_dir = self.root / STATE_DIR
        self.dicom_seg_dir = self.root / DICOM_SEG_DIR
        self.dicom_seg = dicom_seg
        self.labels = _task_labels(self.root / "dataset.json")
        self.modality = _task_modality(self.root / "dataset.json")
        self._cache: OrderedDict[str, Image] = OrderedDict()
        self._cache_size = cache_images
        self._lock = threading.RLock()
        self._listing: tuple[int, dict[str, ImageEntry]] | None = None

    # ---- listing -------------------------------------------------------------------------------------------
    def entries(self) -> dict[str, ImageEntry]:
        """Image id -> entry, sorted by id (listed again when the folder changes: images added appear)."""
        stamp = self.images_dir.stat().st_mtime_ns
        with self._lock:
            if self._listing is not None and self._listing[0] == stamp:
                return self._listing[1]
        found = self._list()
        with self._lock:
            self._listing = (stamp, found)
        return found

    def _list(self) -> dict[str, ImageEntry]:
        skip = {self.labels_dir, self.state_dir, self.dicom_seg_dir, self.root / "imagesTr"}
        cases = cases_of(self.images_dir) if any(self._candidates()) else {}
        found: dict[str, ImageEntry] = {}
        for case, files in sorted(cases.items()):
            if any(f in skip or not self._inside(f) for f in files):
                continue
            if len(files) == 1 and files[0].is_dir() and not any(files[0].iterdir()):
                continue
            found[case] = ImageEntry(case, tuple(files))
        return found

    def _candidates(self) -> list[Path]:
        skip = {LABELS_DIR, STATE_DIR, DICOM_SEG_DIR, "imagesTr"}
        return [
            p
            for p in self.images_dir.iterdir()
            if not p.name.startswith(".") and p.name not in skip and (p.is_dir() or is_image_file(p))
        ]

    def _inside(self, path: Path) -> bool:
        """True when ``path`` (a symlink resolved) lies inside the workspace."""
        return path.resolve().is_relative_to(self.root)

    def entry(self, image_id: str) -> ImageEntry:
        """The entry of ``image_id``.

        Raises:
            UnknownImage: not an image of this workspace.
        """
        entry = self.entries().get(image_id)
        if entry is None:
            raise UnknownImage(f"no image {image_id[:100]!r} in this workspace")
        return entry

    # ---- images and labels ---------------------------------------------------------------------------------
    def image(self, image_id: str) -> Image:
        """The image (channels stacked), read once and kept in a small LRU.

        Raises:
            UnknownImage: not listed. MedsegError: unreadable.
        """
        with self._lock:
            if image_id in self._cache:
                self._cache.move_to_end(image_id)
                return self._cache[image_id]
        image = load_channels(self.entry(image_id).files)
        with self._lock:
            self._cache[image_id] = image
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return image

    def label_path(self, image_id: str) -> Path:
        """Where the finished label map of ``image_id`` goes (``labelsTr/<id>.<ext>``: the image's format when
        it holds labels losslessly, else NIfTI).

        Raises:
            MedsegError: ``labelsTr`` or the label file is a symlink leading out of the workspace.
        """
        path = _label_path(self.entry(image_id), self.labels_dir)
        if not self._inside(path):
            raise MedsegError("leads out of the workspace (a symlink); the workbench writes only inside it", path)
        return path

    def dicom_seg_path(self, image_id: str) -> Path | None:
        """Where the DICOM-SEG of ``image_id``'s finished label map goes (``dicom-seg/<id>.dcm``); None for an
        image that is not a DICOM series, or when the workspace writes none (``dicom_seg=False``).

        Raises:
            UnknownImage: not listed. MedsegError: the path leads out of the workspace (a symlink).
        """
        files = self.entry(image_id).files
        if not self.dicom_seg or len(files) != 1 or not files[0].is_dir():
            return None
        path = self.dicom_seg_dir / f"{image_id}.dcm"
        if not self._inside(path):
            raise MedsegError("leads out of the workspace (a symlink); the workbench writes only inside it", path)
        return path

    def draft_path(self, image_id: str) -> Path:
        """Where medseg keeps the draft of ``image_id`` (``.medseg/drafts/<id>.nii.gz``)."""
        self.entry(image_id)
        return self.state_dir / "drafts" / f"{image_id}.nii.gz"

    def status(self, image_id: str) -> str:
        """``done`` (a label map in labelsTr), ``draft`` (a draft kept) or ``todo``."""
        if self.label_path(image_id).is_file():
            return "done"
        return "draft" if self.draft_path(image_id).is_file() else "todo"

    def done(self) -> list[str]:
        """Ids of the images with a finished label map, in the order they were saved (oldest first)."""
        paths = {i: _label_path(entry, self.labels_dir) for i, entry in self.entries().items()}
        saved = [(path.stat().st_mtime_ns, i) for i, path in paths.items() if path.is_file()]
        return [i for _, i in sorted(saved)]

    def statuses(self) -> dict[str, str]:
        """Image id -> `status`, for every image."""
        done = set(self.done())
        return {i: "done" if i in done else "draft" if self.draft_path(i).is_file() else "todo" for i in self.entries()}

    def label(self, image_id: str) -> np.ndarray:
        """The finished label map of ``image_id`` as an integer array on the image's grid.

        Raises:
            MedsegError: none saved, or one that does not fit the image.
        """
        path = self.label_path(image_id)
        if not path.is_file():
            raise MedsegError(f"image {image_id!r} has no finished label map", path)
        return self.check_label(image_id, load(path).array)

    def check_label(self, image_id: str, labels: np.ndarray) -> np.ndarray:
        """``labels`` as the image's label map: integer, on its grid, with the task's values only.

        Raises:
            MedsegError: another shape, non-integer or negative values, values the task does not name.
        """
        from medseg.io.image import label_array

        image = self.image(image_id)
        array = label_array(np.asarray(labels), f"label map of {image_id}")
        if array.shape != image.shape:
            raise MedsegError(f"label map of shape {array.shape} for image {image_id!r} of shape {image.shape}")
        unknown = sorted(set(np.unique(array).tolist()) - set(self.labels.values()))
        if unknown:
            raise MedsegError(f"label values {unknown[:5]} are not in the task's labels {self.labels}")
        return array.astype(np.uint8)  # task values are at most 255 (_task_labels)

    def save_label(self, image_id: str, labels: np.ndarray) -> Path:
        """Write the finished label map of ``image_id`` atomically, in the image's geometry; drop its draft. For a
        DICOM series, first its DICOM-SEG (`dicom_seg_path`; SEMIAUTOMATIC, segments named by the task's labels).

        Raises:
            MedsegError: as `check_label`; a DICOM series a SEG cannot reference (missing attributes, another
                grid; nothing is written then); a file cannot be written.
        """
        array = self.check_label(image_id, labels)
        image = self.image(image_id)
        target = self.label_path(image_id)
        seg_target = self.dicom_seg_path(image_id)
        files = self.entry(image_id).files
        with self._lock:
            # The SEG and the label map change together or not at all: the previous SEG is kept aside until the
            # label map is written, and put back if it is not.
            previous = None
            if seg_target is not None and seg_target.is_file():
                previous = seg_target.with_name(f".{seg_target.name}.previous")
                shutil.copy2(seg_target, previous)
            try:
                if seg_target is not None:
                    self._save_dicom_seg(image.with_array(array), seg_target, files[0])
                save(image.with_array(array), target, protect=files)
            except MedsegError:
                if seg_target is not None and previous is not None:
                    os.replace(previous, seg_target)
                elif seg_target is not None:  # no SEG newer than the label map it was made with
                    seg_target.unlink(missing_ok=True)
                raise
            finally:
                if previous is not None:
                    previous.unlink(missing_ok=True)
            self.draft_path(image_id).unlink(missing_ok=True)
        return target

    def _save_dicom_seg(self, label: Image, target: Path, series: Path) -> None:
        names = {value: name for name, value in self.labels.items() if value != 0}
        try:
            save_dicom_seg(
                label,
                target,
                series,
                segment_names=names,
                algorithm_type="SEMIAUTOMATIC",
                algorithm_name="medseg workbench",
                series_description="medseg workbench annotation",
            )
        except MedsegError as error:
            hint = "; serve with --no-dicom-seg to save the label map without a DICOM-SEG"
            raise MedsegError(error.problem + hint, error.path) from None

    def save_draft(self, image_id: str, labels: np.ndarray, engine: str) -> Path:
        """Keep a draft (and the name of the engine that made it) in ``.medseg/drafts``."""
        image = self.image(image_id)
        path = self.draft_path(image_id)
        with self._lock:
            save(image.with_array(self.check_label(image_id, labels)), path)
            write_json(path.with_name(f"{image_id}.json"), {"engine": engine})
        return path

    def draft(self, image_id: str) -> tuple[np.ndarray, str] | None:
        """The kept draft of ``image_id`` and its engine, or None."""
        path = self.draft_path(image_id)
        if not path.is_file():
            return None
        meta = path.with_name(f"{image_id}.json")
        engine = json.loads(meta.read_text()).get("engine", "unknown") if meta.is_file() else "unknown"
        return load(path).array, engine

    # ---- export --------------------------------------------------------------------------------------------
    def export(self, target: Path, name: str = "Workspace") -> Path:
        """The finished annotations as an nnU-Net raw dataset (``imagesTr/<id>_0000.<ext>``, ``labelsTr/``,
        ``dataset.json``); images are linked (hard links where possible, else copied), never moved.

        Raises:
            MedsegError: no finished annotation, done images with different channel counts, or ``target`` exists
                and is not empty.
        """
        done = self.done()
        if not done:
            raise MedsegError("no finished annotations to export yet")
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise MedsegError("exists and is not an empty folder", target)
        (target / "imagesTr").mkdir(parents=True, exist_ok=True)
        (target / "labelsTr").mkdir(parents=True, exist_ok=True)
        counts = {self.image(image_id).channels for image_id in done}
        if len(counts) > 1:
            raise MedsegError(f"the done images have {sorted(counts)} channels: one dataset needs one channel count")
        labels = {image_id: self.label_path(image_id) for image_id in done}
        endings = {"".join(path.suffixes) for path in labels.values()}
        ending = endings.pop() if len(endings) == 1 else ".nii.gz"  # mixed formats: every file as NIfTI
        for image_id in done:
            files = self.entry(image_id).files
            for k, file in enumerate(files):  # one file per channel, nnU-Net's _0000, _0001...
                written = target / "imagesTr" / f"{image_id}_{k:04d}{ending}"
                if file.is_file() and split_extension(file)[1].lower() == ending:
                    _link(file, written)
                else:  # DICOM, JPEG, another format: written in the dataset's
                    save(load(file), written)
            if "".join(labels[image_id].suffixes) == ending:
                _link(labels[image_id], target / "labelsTr" / f"{image_id}{ending}")
            else:
                save(self.image(image_id).with_array(self.label(image_id)), target / "labelsTr" / f"{image_id}{ending}")
        channels = self.image(done[0]).channels
        declared = _declared_channels(self.root / "dataset.json")
        default = ["R", "G", "B"] if channels == 3 else [f"channel {i}" for i in range(channels)]
        names = declared if declared is not None and len(declared) == channels else dict(enumerate(default))
        names = {str(k): v for k, v in names.items()}  # an RGB file is three channels to medseg dataset check
        info = {
            "name": name,
            "channel_names": names,
            "labels": self.labels,
            "numTraining": len(done),
            "file_ending": ending,
        }
        write_json(target / "dataset.json", info)
        return target


def _declared_channels(path: Path) -> dict[str, str] | None:
    """``channel_names`` of nnU-Net's ``dataset.json`` at ``path``, or None."""
    try:
        names = json.loads(path.read_text(encoding="utf-8-sig"))["channel_names"]
        return {str(k): str(v) for k, v in names.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _label_path(entry: ImageEntry, labels_dir: Path) -> Path:
    return label_path_for(entry.files[0], labels_dir, entry.id)


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        import shutil

        shutil.copyfile(source, target)


def _task_modality(path: Path) -> str | None:
    """``dataset.json``'s ``modality`` (a name, or MSD's ``{"0": "CT"}``), else its first channel name (nnU-Net
    v2's ``channel_names``), or None."""
    try:
        info = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    for named in (info.get("modality"), info.get("channel_names")):
        if isinstance(named, dict) and named:
            named = next(iter(named.values()))
        if isinstance(named, str):
            return named
    return None


def _task_labels(path: Path) -> dict[str, int]:
    """The task's labels, name -> value, from nnU-Net's ``dataset.json`` (default: one foreground label)."""
    if not path.is_file():
        return dict(DEFAULT_LABELS)
    try:
        labels = json.loads(path.read_text(encoding="utf-8-sig"))["labels"]
        parsed = {str(k): int(v) for k, v in labels.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise MedsegError("unreadable labels (expected nnU-Net's {'labels': {name: value}})", path) from None
    if parsed.get("background", 0) != 0 or any(v < 0 for v in parsed.values()):
        raise MedsegError("labels must be non-negative with background 0", path)
    if any(v > 255 for v in parsed.values()):
        raise MedsegError("the workbench takes label values up to 255 (label maps are uint8)", path)
    return parsed
