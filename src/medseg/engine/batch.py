"""Batch prediction that goes on past a bad case and picks up where it stopped: in this process, or on Ray.

Behind ``--batch`` and ``--ray`` of ``medseg predict``, ``medseg incontext`` and ``medseg prompt``. An engine takes
part through a `CaseRunner` (`medseg.engine.batch_runners`): plain values, which travel to Ray's workers, whose
`CaseRunner.build` makes the predictor once per worker (a model loaded, a support set prepared) and hands back a
`CasePredictor`, the function for one case. The rest is shared: unlike `medseg.inference.folders.predict_folder`
(all or nothing), each case's label map is written on its own as soon as it is done (in a hidden folder inside
``OUT``, then renamed into place, so a killed worker leaves no partial file), a case that cannot be segmented
becomes a ``failed`` row of ``OUT/manifest.csv`` (`medseg.engine.manifest`) and the run goes on, and a second run
skips the cases whose label map exists for the same model and input files (`medseg.engine.manifest.case_hash`) and
is not newer than the manifest (else another run wrote it). Every input is listed in the manifest (``pending``)
as the run starts, and ``OUT/.medseg.lock`` (`medseg.inference.run_lock`) keeps a second run out while one goes on.

On Ray (`medseg.engine.batch_ray`, an optional dependency imported only when asked for) the inputs' paths go to a
pool of actors that build the predictor once and write the label maps themselves: only paths and rows travel,
never volumes.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import os
import resource
import secrets
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from medseg.engine.manifest import (
    DONE,
    FAILED,
    MANIFEST,
    PENDING,
    Row,
    case_hash,
    case_key,
    read_manifest,
    write_manifest,
)
from medseg.engine.run_files import atomic_write
from medseg.errors import MedsegError
from medseg.inference.run_lock import check_unlocked, output_lock

if TYPE_CHECKING:
    from medseg.inference.engines import Segmentation
    from medseg.io import Image

_MANIFEST_EVERY = 2.0  # seconds between rewrites of the manifest while a run goes on


@dataclass
class CasePredictor:
    """What a `CaseRunner` builds once per worker.

    ``load``: a case's files -> its `Image`. ``segment``: (case name, image) -> its `Segmentation`, raising
    MedsegError for a case it cannot take. The rest says how the label maps are written (as
    `medseg.inference.folders.write_prediction`): DICOM-SEG segment names and algorithm, and ``probabilities``:
    also ``OUT/probabilities/<case>.npz``.
    """

    load: Callable[[Sequence[Path]], Image]
    segment: Callable[[str, Image], Segmentation]
    segment_names: Mapping[int, str] | None = None
    algorithm_name: str = "medseg"
    algorithm_type: str = "AUTOMATIC"
    probabilities: bool = False


class CaseRunner(abc.ABC):
    """One engine's part in a batch run. Subclasses are frozen dataclasses of plain values (pickled to Ray's
    workers) with an ``output_format`` (``auto``, ``nifti`` or ``dicom-seg``)."""

    output_format: str

    @abc.abstractmethod
    def absolute(self) -> CaseRunner:
        """This runner with its paths absolute (Ray's workers run in other folders, on other machines)."""

    @abc.abstractmethod
    def model(self) -> str:
        """A `medseg.engine.manifest.content_hash` of all that makes the outputs: weights, options, supports.

        Raises:
            MedsegError: a file cannot be read.
        """

    @abc.abstractmethod
    def build(self) -> CasePredictor:
        """The predictor, built once per worker.

        Raises:
            MedsegError: the model or what it needs cannot be loaded.
        """

    def case_model(self, model: str, case: str) -> str:
        """The manifest's ``model`` of one case: ``model``, or more where a case has its own inputs (boxes)."""
        return model

    def protect(self) -> list[Path]:
        """Files besides the inputs that a label map must never overwrite (a support set)."""
        return []


@dataclass
class BatchResult:
    """A run's counts: ``done`` and ``failed`` this run, ``skipped`` (done by an earlier run with the same model),
    ``seconds`` of wall time, and ``peak_mb``: worker (process id) -> its peak resident memory in MiB."""

    done: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    peak_mb: dict[int, float] = field(default_factory=dict)


class CaseWorker:
    """A runner's predictor, built once, that segments cases one by one and writes each label map into ``output``.

    Raises:
        MedsegError: as the runner's `CaseRunner.build`.
    """

    def __init__(self, runner: CaseRunner, output: str | Path, run: str = "") -> None:
        self.runner = runner
        self.output = Path(output)
        self.run = run  # the batch run's token, in its staging folders' names (removed at the run's end)
        self.predictor = runner.build()

    def __call__(self, case: str, files: Sequence[str | Path], target: str | Path) -> tuple[str, float, str]:
        """Segment ``case`` (its ``files``) and write its label map to ``target`` (a file in ``output``).

        Returns:
            (status, seconds, error): ``done`` or ``failed``, wall time, and for a failed case one line naming
            the file and the problem (an unexpected exception too: the run goes on).
        """
        from medseg.inference.folders import not_a_segmentation, staging, write_prediction
        from medseg.io.dicom_source import check_grid, read_source

        started = time.perf_counter()
        paths = [Path(f) for f in files]
        target = Path(target)
        predictor, output_format = self.predictor, self.runner.output_format
        try:
            image = predictor.load(paths)
            not_a_segmentation(image, paths[0])
            if output_format == "dicom-seg":
                check_grid(image, read_source(paths[0]), paths[0])
            result = predictor.segment(case, image)
            with staging(self.output, self.run) as folder:
                write_prediction(
                    result,
                    folder,
                    target,
                    paths,
                    protect=[*paths, *self.runner.protect()],
                    probabilities_name=f"{case}.npz" if predictor.probabilities else None,
                    output_format=output_format,
                    segment_names=predictor.segment_names,
                    algorithm_name=predictor.algorithm_name,
                    algorithm_type=predictor.algorithm_type,
                )
        except MedsegError as error:
            return FAILED, time.perf_counter() - started, str(MedsegError(error.problem, error.path or paths[0]))
        except Exception as error:  # a bug or a library's surprise on one file must not end a run of thousands
            where = traceback.extract_tb(error.__traceback__)[-1]
            problem = f"{type(error).__name__}: {error} (at {Path(where.filename).name}:{where.lineno})"
            return FAILED, time.perf_counter() - started, f"{paths[0]}: {' '.join(problem.split())}"
        return DONE, time.perf_counter() - started, ""


def peak_memory_mb() -> float:
    """This process's peak resident memory in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_batch(
    runner: CaseRunner,
    cases: Mapping[str, Sequence[Path]],
    output: Path,
    *,
    use_ray: bool = False,
    ray_address: str | None = None,
    workers: int | None = None,
    on_row: Callable[[Row], None] | None = None,
) -> BatchResult:
    """Segment every case not done yet into ``output``, recording each in ``output/manifest.csv``.

    Args:
        runner: the engine, its weights and options (`medseg.engine.batch_runners`).
        cases: case name -> its files (`medseg.inference.folders.cases_of`).
        use_ray: run on Ray: the cluster at ``ray_address``, else a local one started (and stopped) here; an
            already initialised Ray is used as it is.
        workers: Ray actors (default: the cluster's CPUs).
        on_row: called with each case's row as it is recorded (progress).

    Returns:
        The counts (`BatchResult`); failed cases are rows of the manifest, not exceptions.

    Raises:
        MedsegError: before any work, as `label_targets` and the runner's `CaseRunner.build`, an ``output`` that
            cannot be written, whose manifest is not medseg's or that another run is writing into, Ray missing
            or unreachable (then ``output`` is left as it was: its manifest as before, or none and no
            ``output`` when this run made it); on Ray, a failure of Ray itself (the manifest keeps every case
            finished before it).
    """
    from medseg.engine import batch_ray
    from medseg.inference.folders import label_targets

    started = time.perf_counter()
    with batch_ray.local_ray_env(use_ray and not ray_address):
        if use_ray:
            batch_ray.import_ray()
            if ray_address:
                batch_ray.check_reachable(ray_address)
        runner = runner.absolute()  # absolute paths: Ray's workers run in other folders, on other machines
        output = Path(os.path.abspath(output))
        cases = {case: [Path(os.path.abspath(f)) for f in files] for case, files in cases.items()}
        targets = label_targets(cases, output, runner.protect(), runner.output_format)
        check_unlocked(output)
        read_manifest(output / MANIFEST)  # not medseg's: refused before the model loads
        model = runner.model()
        models = {case: case_hash(runner.case_model(model, case), files) for case, files in cases.items()}
        run = secrets.token_hex(4)  # names this run's staging folders
        worker: CaseWorker | None = CaseWorker(runner, output, run)  # with Ray it only proves that the model loads
        if use_ray:
            worker = None  # the actors build their own
        made = not output.exists()
        try:
            output.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise MedsegError(f"cannot write here ({error.strerror})", output) from None
        ray = (ray_address, workers) if use_ray else None
        try:
            with output_lock(output):
                result = _run(runner, worker, cases, targets, models, output, ray, on_row, run)
        except batch_ray.RayUnavailable:  # nothing done: _run put the manifest back, the lock is gone
            if made and output.is_dir() and not any(output.iterdir()):
                output.rmdir()
            raise
    result.seconds = time.perf_counter() - started
    return result


def _run(
    runner: CaseRunner,
    worker: CaseWorker | None,
    cases: Mapping[str, Sequence[Path]],
    targets: Mapping[str, Path],
    models: Mapping[str, str],
    output: Path,
    ray: tuple[str | None, int | None] | None,
    on_row: Callable[[Row], None] | None,
    run: str,
) -> BatchResult:
    """`run_batch` holding the lock: the manifest with every case (``pending`` those to do), then the cases in
    ``worker`` or, with ``ray`` (address, workers), on Ray."""
    from medseg.engine import batch_ray
    from medseg.inference.folders import remove_stale_staging

    manifest_path = output / MANIFEST
    earlier = read_manifest(manifest_path)
    original = manifest_path.read_bytes() if manifest_path.is_file() else None
    recorded = _mtime(manifest_path)
    keys = {case: case_key(files) for case, files in cases.items()}
    todo = [c for c in cases if not _done_before(earlier.get(keys[c]), models[c], targets[c], recorded)]
    rows: dict[str, Row] = {keys[case]: earlier[keys[case]] for case in cases if keys[case] in earlier}
    rows.update({keys[c]: Row(keys[c], str(targets[c]), PENDING, 0.0, "", models[c]) for c in todo})
    others = [row for key, row in earlier.items() if key not in rows]  # other inputs' rows stay
    result = BatchResult(skipped=len(cases) - len(todo))
    write_manifest(manifest_path, _ordered(rows, keys, others))  # a kill from now on leaves every input listed
    last_write = time.perf_counter()

    def record(case: str, status: str, seconds: float, error: str) -> None:
        nonlocal last_write
        row = Row(keys[case], str(targets[case]), status, seconds, error, models[case])
        rows[row.path] = row
        if status == FAILED:
            _remove_stale_output(earlier.get(keys[case]), output, [*cases[case], *runner.protect()])
        result.done += status == DONE
        result.failed += status == FAILED
        if on_row is not None:
            on_row(row)
        if time.perf_counter() - last_write > _MANIFEST_EVERY:
            write_manifest(manifest_path, _ordered(rows, keys, others))
            last_write = time.perf_counter()

    unavailable = False
    try:
        if ray is not None:
            items = [{"case": c, "files": "\n".join(map(str, cases[c])), "target": str(targets[c])} for c in todo]
            for got in batch_ray.ray_rows(items, runner, output, *ray, run=run):
                record(got["case"], got["status"], got["seconds"], got["error"])
                result.peak_mb[got["pid"]] = max(result.peak_mb.get(got["pid"], 0.0), got["peak_mb"])
        elif worker is not None:
            for case in todo:
                record(case, *worker(case, cases[case], targets[case]))
            result.peak_mb[os.getpid()] = peak_memory_mb()
    except batch_ray.RayUnavailable:  # no case was done: the manifest as it was before this run
        if original is None:
            manifest_path.unlink(missing_ok=True)
        else:
            atomic_write(manifest_path, lambda f: f.write(original))
        unavailable = True
        raise
    finally:
        if not unavailable:  # a kill or Ray's failure too: every case finished so far is recorded
            write_manifest(manifest_path, _ordered(rows, keys, others))
        remove_stale_staging(output, run)  # a killed worker's unfinished case; never another live run's
    return result


def _done_before(row: Row | None, model: str, target: Path, recorded: int | None) -> bool:
    """The row says done with this model and these inputs (`case_hash`), and its label map is there and not newer
    than the manifest (``recorded``, its modification time in ns): a run records a case after writing its label
    map, so one written later is another run's (a plain run into the same folder, another model)."""
    if row is None or row.status != DONE or row.model != model or row.output != os.path.abspath(target):
        return False
    written = _mtime(target)
    return written is not None and recorded is not None and written <= recorded


def _remove_stale_output(row: Row | None, output: Path, keep: Sequence[Path]) -> None:
    """Remove the label map an earlier run recorded for a case that failed now (its input truncated, its box row
    gone): left there it would read as this run's. Only a file inside ``output``, never one of ``keep``."""
    if row is None or not row.output:
        return
    stale = Path(os.path.abspath(row.output))
    if not stale.is_relative_to(output) or stale == output / MANIFEST or not (stale.is_file() or stale.is_symlink()):
        return
    if any(stale == Path(os.path.abspath(path)) or stale.resolve() == Path(path).resolve() for path in keep):
        return
    with contextlib.suppress(OSError):
        stale.unlink()


def _mtime(path: Path) -> int | None:
    """A file's modification time in ns, None when it is not there."""
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _ordered(rows: Mapping[str, Row], keys: Mapping[str, str], others: Sequence[Row]) -> list[Row]:
    """This run's rows in the cases' order, then the rows of inputs of earlier runs not in this one."""
    return [rows[key] for key in keys.values() if key in rows] + list(others)


def absolute_paths(runner: CaseRunner, *names: str) -> CaseRunner:
    """``runner`` with the path fields ``names`` made absolute (those that are set)."""
    values = {name: os.path.abspath(getattr(runner, name)) for name in names if getattr(runner, name) is not None}
    return dataclasses.replace(runner, **values)  # type: ignore[type-var]
