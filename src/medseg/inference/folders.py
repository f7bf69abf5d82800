"""`predict_folder`: every case of an input segmented by one engine, label maps written all or nothing.

Behind ``medseg predict``, ``medseg incontext`` and the server's batch drafts: every input and target is
checked before any work (for DICOM-SEG output, each case's DICOM series too: its headers and its grid), label
maps go to a hidden folder inside the output folder and are moved into place only when every case is done, so
a refused case leaves no partial output and overwrites no earlier one.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np

from medseg.data.cases import load_channels
from medseg.errors import MedsegError
from medseg.inference.engines import Segmentation
from medseg.io import Image, case_of, format_of, label_path_for, save
from medseg.io.dicom_seg import save_dicom_seg
from medseg.io.dicom_source import check_grid, read_source
from medseg.io.formats import is_image_file, split_channel, split_extension

_T = TypeVar("_T")


def cases_of(input_path: Path | str, skip: Path | None = None) -> dict[str, list[Path]]:
    """Cases of an input, case name -> its files: one file; one DICOM series folder; a folder of files
    (channels grouped by their ``_0000`` suffixes) and of DICOM series sub-folders; a glob (``scans/*.nii.gz``);
    or a list of paths, a ``.txt`` file (one a line, ``#`` comments) or a ``.csv`` file (its ``path`` column,
    else its first), relative paths taken from the list's folder. ``skip``: a folder (the output folder) left
    out of a folder's entries and a glob's matches, with all inside it, so that a run's label maps are never
    read as inputs by the next run.

    Raises:
        MedsegError: no such file or folder; a glob that matches nothing; a list that is empty or names a
            missing path; two listed files of one case name in different folders; one file named twice in a
            case (two spellings, or a link and its target).
    """
    text = str(input_path)
    input_path = Path(input_path)
    if not input_path.exists() and any(char in text for char in "*?["):
        found = glob.glob(text, recursive=True)
        matches = sorted(Path(p) for p in found if not Path(p).name.startswith(".") and not _inside(Path(p), skip))
        if not matches:
            raise MedsegError("the pattern matches no file or folder", input_path)
        return _grouped(matches, input_path)
    if not input_path.exists():
        raise MedsegError("no such file or folder", input_path)
    if input_path.is_file() and input_path.suffix.lower() in (".txt", ".csv"):
        return _grouped(_listed(input_path), input_path)
    if input_path.is_file():
        return {case_of(input_path): [input_path]}
    entries = sorted(p for p in input_path.iterdir() if not p.name.startswith(".") and not _inside(p, skip))
    files = [p for p in entries if p.is_file() and is_image_file(p) and not p.name.lower().endswith(".dcm")]
    series = [p for p in entries if p.is_dir()]
    if not files and not series:
        return {case_of(input_path): [input_path]}  # a DICOM series (load names the problem if it is not one)
    cases: dict[str, list[Path]] = {}
    for path in files:
        stem = split_extension(path)[0]
        split = split_channel(stem)
        cases.setdefault(split[0] if split else stem, []).append(path)
    for folder in series:
        cases.setdefault(folder.name, []).append(folder)
    _each_file_once(cases, input_path)
    return cases


def _inside(path: Path, folder: Path | None) -> bool:
    """Whether ``path`` is ``folder`` or inside it (resolved)."""
    return folder is not None and path.resolve().is_relative_to(Path(folder).resolve())


def _listed(listing: Path) -> list[Path]:
    """The paths a ``.txt`` or ``.csv`` list names, in its order, relative ones from the list's folder."""
    try:
        text = listing.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise MedsegError(f"cannot read the list of inputs ({type(error).__name__})", listing) from None
    if listing.suffix.lower() == ".csv":
        rows = [row for row in csv.reader(io.StringIO(text)) if row and any(cell.strip() for cell in row)]
        header = [cell.strip().lower() for cell in rows[0]] if rows else []
        column = header.index("path") if "path" in header else 0
        names = [row[column].strip() for row in rows[1 if "path" in header else 0 :] if len(row) > column]
    else:
        names = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not names:
        raise MedsegError("the list of inputs is empty", listing)
    paths = [Path(name) if Path(name).is_absolute() else listing.parent / name for name in names if name]
    for path in paths:
        if not path.exists():
            raise MedsegError(f"lists {path}, which does not exist", listing)
    return paths


def _grouped(paths: Sequence[Path], source: Path) -> dict[str, list[Path]]:
    """Files grouped into cases as in a folder (channel suffixes), folders as DICOM series; each path once."""
    cases: dict[str, list[Path]] = {}
    for path in dict.fromkeys(paths):
        split = None if path.is_dir() else split_channel(split_extension(path)[0])
        case = path.name if path.is_dir() else (split[0] if split else split_extension(path)[0])
        files = cases.setdefault(case, [])
        if files and (path.is_dir() or files[0].is_dir() or files[0].parent.resolve() != path.parent.resolve()):
            raise MedsegError(f"{files[0]} and {path} are both case {case} (their label maps would collide)", source)
        files.append(path)
    _each_file_once(cases, source)
    return cases


def _each_file_once(cases: Mapping[str, Sequence[Path]], source: Path) -> None:
    """Raise when a case's files name one file twice (``a/../a/x.png`` and ``a/x.png``, or a link and its
    target): they would be read as two channels of one image."""
    for case, files in cases.items():
        seen: dict[str, Path] = {}
        for path in files:
            real = os.path.realpath(path)
            if real in seen:
                raise MedsegError(
                    f"{seen[real]} and {path} are one file named twice (they would be two channels of case {case})",
                    source,
                )
            seen[real] = path


def not_a_segmentation(image: Image, path: Path) -> None:
    """Raise MedsegError naming ``path`` when ``image`` is a DICOM-SEG (a label map, not an image to segment)."""
    if image.meta.get("format") == "dicom-seg":
        raise MedsegError("is a DICOM-SEG (a label map), not an image to segment", path)


def label_targets(
    cases: Mapping[str, Sequence[Path]], output: Path, protect: Sequence[Path] = (), output_format: str = "auto"
) -> dict[str, Path]:
    """Case -> where its label map goes (`medseg.io.label_path_for` by ``output_format``: ``auto`` the input's
    format, NIfTI for DICOM; ``nifti``; ``dicom-seg`` a ``.dcm`` DICOM-SEG), all checked before any work.

    Raises:
        MedsegError: ``output`` is a file; a target that would overwrite an input (or a ``protect`` file), that
            is a folder, or that two cases share; a format medseg cannot write; ``dicom-seg`` for a case that is
            not one DICOM input.
    """
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise MedsegError("exists and is not a folder", output)
    folders = {p.resolve().parent for files in cases.values() for p in files} | {
        p.resolve() for files in cases.values() for p in files if p.is_dir()
    }
    if output.resolve() in folders:  # label maps among the inputs would be read as inputs (channels) next time
        raise MedsegError("output folder holds the inputs; choose another -o", output)
    inputs = {p.resolve() for files in cases.values() for p in files} | {p.resolve() for p in protect}
    targets: dict[str, Path] = {}
    seen: dict[Path, str] = {}
    for case, files in cases.items():
        if output_format == "dicom-seg" and len(files) > 1:
            raise MedsegError(
                f"DICOM-SEG output takes one DICOM input per case, case {case} has {len(files)}", files[0]
            )
        try:
            target = label_path_for(files[0], output, case, output_format)
        except MedsegError:
            if os.path.lexists(files[0]):
                raise
            # a missing input (a box row naming it) is a failed case, its label map named by the case alone
            target = output / f"{case}{'.dcm' if output_format == 'dicom-seg' else '.nii.gz'}"
        format_of(target)
        if target.resolve() in inputs:
            raise MedsegError(f"refusing to overwrite an input file {target} (choose another -o)", files[0])
        if target in seen:
            raise MedsegError(f"cases {seen[target]} and {case} would both be written to {target.name}", files[0])
        if target.is_dir():
            raise MedsegError(f"a folder is where its label map would go: {target}", files[0])
        seen[target] = case
        targets[case] = target
    return targets


def predict_folder(
    predict: Callable[[Image], Segmentation],
    cases: Mapping[str, Sequence[Path]],
    output: Path,
    *,
    load_case: Callable[[Sequence[Path]], Image] | None = None,
    check: Callable[[Image], None] | None = None,
    protect: Sequence[Path] = (),
    save_probabilities: bool = False,
    on_case: Callable[[], None] | None = None,
    output_format: str = "auto",
    segment_names: Mapping[int, str] | None = None,
    algorithm_name: str = "medseg",
) -> dict[str, Path]:
    """Segment every case with ``predict`` and write its label map into ``output`` (all or nothing).

    Args:
        predict: an engine's ``predict`` (`medseg.inference.engines`), image -> `Segmentation`.
        cases: case name -> its files (`cases_of`).
        load_case: files -> `Image` (default ``medseg.data.cases.load_channels``: channel files stacked).
        check: raises MedsegError for an image the engine cannot take; every case is checked before any work.
        protect: files never to be written over besides the inputs (e.g. a support set).
        save_probabilities: also write ``output/probabilities/<case>.npz`` (``probabilities`` float16 ``(K,
            *spatial)``, ``label_values``).
        on_case: called after each case (progress).
        output_format: ``auto``, ``nifti`` or ``dicom-seg`` (`label_targets`); a DICOM-SEG references the case's
            DICOM series, algorithm type AUTOMATIC.
        segment_names: label value -> name, for DICOM-SEG segments (default ``label 1``, ``label 2``...).
        algorithm_name: the algorithm a DICOM-SEG names.

    Returns:
        case -> the written label map.

    Raises:
        MedsegError: as `label_targets`; a case the engine refuses, named by its file; with ``dicom-seg``, a
            series without the attributes a SEG needs (`medseg.io.dicom_source.read_source`). Nothing is written.
    """
    from medseg.inference.run_lock import check_unlocked, output_lock

    output = Path(output)
    targets = label_targets(cases, output, protect, output_format)
    check_unlocked(output)  # a batch run writing into output: refused before any work
    load_case = load_channels if load_case is None else load_case
    kept = tuple(p for files in cases.values() for p in files) + tuple(protect)
    for files in cases.values():  # every input is read and checked before any work (and read again below)
        if check is not None or output_format == "dicom-seg":
            image = load_case(files)
        if check is not None or output_format == "dicom-seg":
            not_a_segmentation(image, files[0])
        if check is not None:
            _named(check, image, files[0])
        if output_format == "dicom-seg":
            check_grid(image, read_source(files[0]), files[0])
    made = not output.exists()
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise MedsegError(f"cannot write here ({error.strerror})", output) from None
    try:
        with output_lock(output), staging(output) as folder:
            for case, files in cases.items():
                image = load_case(files)
                not_a_segmentation(image, files[0])
                result = _named(predict, image, files[0])
                write_prediction(
                    result,
                    folder,
                    targets[case],
                    files,
                    protect=kept,
                    probabilities_name=f"{case}.npz" if save_probabilities else None,
                    output_format=output_format,
                    segment_names=segment_names,
                    algorithm_name=algorithm_name,
                )
                if on_case is not None:
                    on_case()
    finally:
        if made and output.is_dir() and not any(output.iterdir()):
            output.rmdir()
    return targets


def write_prediction(
    result: Segmentation,
    folder: Path,
    target: Path,
    files: Sequence[Path],
    *,
    protect: Sequence[Path] = (),
    probabilities_name: str | None = None,
    output_format: str = "auto",
    segment_names: Mapping[int, str] | None = None,
    algorithm_name: str = "medseg",
    algorithm_type: str = "AUTOMATIC",
) -> None:
    """Write one case's label map into ``folder`` under ``target``'s name (a DICOM-SEG referencing ``files[0]``
    for ``dicom-seg``), and with ``probabilities_name`` its probabilities as
    ``folder/probabilities/<probabilities_name>`` (see `predict_folder`); a DICOM-SEG names ``algorithm_type``
    (``AUTOMATIC``, ``SEMIAUTOMATIC`` for prompts).

    Raises:
        MedsegError: the label map cannot be written, named by ``target``.
    """
    try:
        if output_format == "dicom-seg":
            save_dicom_seg(
                result.labels,
                folder / target.name,
                files[0],
                segment_names=segment_names,
                algorithm_name=algorithm_name,
                algorithm_type=algorithm_type,
                protect=tuple(protect),
            )
        else:
            save(result.labels, folder / target.name, protect=tuple(protect))
    except MedsegError as error:  # named by where it was going, not the hidden folder
        raise MedsegError(error.problem, target) from None
    if probabilities_name is not None and result.probabilities is not None:
        (folder / "probabilities").mkdir(exist_ok=True)
        np.savez_compressed(
            folder / "probabilities" / probabilities_name,
            probabilities=result.probabilities.astype(np.float16),
            label_values=np.asarray(result.label_values),
        )


def _named(call: Callable[[Image], _T], image: Image, path: Path) -> _T:
    """``call(image)``, with a MedsegError that names no file naming ``path``."""
    try:
        return call(image)
    except MedsegError as error:
        raise MedsegError(error.problem, error.path or path) from None


STAGING_PREFIX = ".medseg-staging."
# A staging folder whose process cannot be checked (made on another machine sharing the folder, or before the
# pid was part of the name) is taken for a killed run's once it has been left alone this long.
_UNCHECKED_STAGING_AGE_S = 3600.0


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine is running (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def process_owner() -> str:
    """``<pid>@<host>`` of this process: who a staging folder or a batch run's lock belongs to (the host keeps a
    shared folder's pids apart)."""
    return f"{os.getpid()}@{socket.gethostname().replace('.', '_')}"


def remove_stale_staging(output: Path, run: str = "") -> list[Path]:
    """Remove the staging folders in ``output`` that killed runs left: those of this machine whose process (in
    the folder's name, ``.medseg-staging.<pid>@<host>.<run>-<random>``) has ended, and any other left untouched
    for an hour; with ``run``, also that run's own (a batch run's, at its end: its workers may be other
    processes, on other machines). Folders of runs still going are kept. Returns the removed.
    """
    removed: list[Path] = []
    if not output.is_dir():
        return removed
    host = process_owner().split("@", 1)[1]
    for entry in output.iterdir():
        if not entry.name.startswith(STAGING_PREFIX) or not entry.is_dir() or entry.is_symlink():
            continue
        pid_text, _, rest = entry.name[len(STAGING_PREFIX) :].partition("@")
        where, _, tail = rest.rpartition(".")
        if run and tail.startswith(f"{run}-"):
            stale = True
        elif pid_text.isdigit() and where == host:
            stale = int(pid_text) != os.getpid() and not process_alive(int(pid_text))
        else:
            try:
                stale = time.time() - entry.stat().st_mtime > _UNCHECKED_STAGING_AGE_S
            except OSError:  # gone meanwhile
                continue
        if stale:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextmanager
def staging(output: Path, run: str = "") -> Iterator[Path]:
    """A hidden folder in ``output`` (created if needed) whose files and folders are moved into ``output`` when
    the block ends normally; on an error it goes, and so does ``output`` if this made it and it is left empty.
    Staging folders of earlier runs that were killed (`remove_stale_staging`) are removed first. ``run``: a
    batch run's token (letters and digits), in the folder's name so that the run removes its own at its end.

    Raises:
        MedsegError: ``output`` cannot be written.
    """
    made = not output.exists()
    try:
        output.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(output)
        folder = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{process_owner()}.{run}-", dir=output))
    except OSError as error:
        raise MedsegError(f"cannot write here ({error.strerror})", output) from None
    try:
        yield folder
        _move_into(folder, output)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if made and output.is_dir() and not any(output.iterdir()):
            output.rmdir()


def _move_into(source: Path, target: Path) -> None:
    # headers last (.mhd / .nhdr name their data file, which must be in place first)
    for entry in sorted(source.iterdir(), key=lambda f: f.suffix in (".mhd", ".nhdr")):
        if entry.is_dir():
            (target / entry.name).mkdir(exist_ok=True)
            _move_into(entry, target / entry.name)
        else:
            os.replace(entry, target / entry.name)
