"""Batch prediction that goes on past a bad case and picks up where it stopped: in this process, or on Ray.

Behind ``medseg predict --batch`` and ``medseg predict --ray``. Unlike `medseg.inference.folders.predict_folder`
(all or nothing), each case's label map is written on its own as soon as it is done (in a hidden folder inside
``OUT``, then renamed into place, so a killed worker leaves no partial file), a case that cannot be segmented
becomes a ``failed`` row of ``OUT/manifest.csv`` (`medseg.engine.manifest`) and the run goes on, and a second run
skips the cases whose label map exists for the same `model_hash`.

On Ray (an optional dependency, imported only here and only when asked for) the inputs' paths go through Ray
Data (``from_items(...).map_batches(...)``) to a pool of actors, one CPU each, that load the model once and write
the label maps themselves: only paths and rows travel, never volumes. Every node must see the model folder, the
inputs and ``OUT`` at the same paths (a shared file system) and have medseg installed. Ray restarts a killed
actor and runs its block of cases again; their label maps are rewritten in place, and the driver records each
case once.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import resource
import shutil
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.engine.manifest import DONE, FAILED, MANIFEST, Row, case_key, model_hash, read_manifest, write_manifest
from medseg.errors import MedsegError

RAY_MISSING = "--ray needs Ray, an optional extra: pip install 'medseg[ray]'"
_MANIFEST_EVERY = 2.0  # seconds between rewrites of the manifest while a run goes on


@dataclass(frozen=True)
class BatchOptions:
    """What a worker needs to rebuild the predictor (plain values: they travel to Ray workers)."""

    model_dir: str
    device: str = "cpu"
    mirror: bool = False
    save_probabilities: bool = False
    output_format: str = "auto"
    series: str | None = None  # of DICOM folders holding several series (`medseg.io.load`)
    frame: int | None = None  # of 4D inputs

    def model(self) -> str:
        """`model_hash` of the weights, the plan and the options that change what is written."""
        chosen = {k: v for k, v in (("series", self.series), ("frame", self.frame)) if v is not None}
        return model_hash(
            Path(self.model_dir),
            mirror=self.mirror,
            save_probabilities=self.save_probabilities,
            output_format=self.output_format,
            **chosen,  # only when given: a run without them keeps the hash it had
        )


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
    """One model, loaded once, that segments cases one by one and writes each label map into ``output``.

    Raises:
        MedsegError: as `SpecialistEngine.from_pretrained` (an unreadable model folder).
    """

    def __init__(self, options: BatchOptions, output: str | Path) -> None:
        from medseg.inference.engines import SpecialistEngine

        self.options = options
        self.output = Path(output)
        self.engine = SpecialistEngine.from_pretrained(options.model_dir, options.device)
        plan = self.engine.predictor.plan
        self.segment_names = {value: name for name, value in plan.labels.items() if value != 0}
        self.algorithm_name = f"medseg specialist ({plan.network.name})"

    def __call__(self, case: str, files: Sequence[str | Path], target: str | Path) -> tuple[str, float, str]:
        """Segment ``case`` (its ``files``) and write its label map to ``target`` (a file in ``output``).

        Returns:
            (status, seconds, error): ``done`` or ``failed``, wall time, and for a failed case one line naming
            the file and the problem (an unexpected exception too: the run goes on).
        """
        from medseg.data.cases import load_channels
        from medseg.inference.folders import not_a_segmentation, staging, write_prediction
        from medseg.io.dicom_source import check_grid, read_source

        started = time.perf_counter()
        paths = [Path(f) for f in files]
        target = Path(target)
        try:
            image = load_channels(paths, series=self.options.series, frame=self.options.frame)
            not_a_segmentation(image, paths[0])
            self.engine.check(image)
            if self.options.output_format == "dicom-seg":
                check_grid(image, read_source(paths[0]), paths[0])
            options = self.options
            result = self.engine.predict(image, probabilities=options.save_probabilities, mirror=options.mirror)
            with staging(self.output) as folder:
                write_prediction(
                    result,
                    folder,
                    target,
                    paths,
                    protect=paths,
                    probabilities_name=f"{case}.npz" if self.options.save_probabilities else None,
                    output_format=self.options.output_format,
                    segment_names=self.segment_names,
                    algorithm_name=self.algorithm_name,
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


def predict_batch(
    options: BatchOptions,
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
        options: the model folder and the prediction options.
        cases: case name -> its files (`medseg.inference.folders.cases_of`).
        use_ray: run on Ray: the cluster at ``ray_address``, else a local one started (and stopped) here; an
            already initialised Ray is used as it is.
        workers: Ray actors (default: the cluster's CPUs).
        on_row: called with each case's row as it is recorded (progress).

    Returns:
        The counts (`BatchResult`); failed cases are rows of the manifest, not exceptions.

    Raises:
        MedsegError: before any work, as `label_targets` and `SpecialistEngine.from_pretrained`, an ``output``
            that cannot be written or whose manifest is not medseg's, Ray missing or unreachable; on Ray, a
            failure of Ray itself (the manifest keeps every case finished before it).
    """
    from medseg.inference.folders import label_targets

    started = time.perf_counter()
    if use_ray:
        _import_ray()
        if ray_address:
            _check_reachable(ray_address)
    # absolute paths: Ray's workers run in other folders, on other machines
    options = dataclasses.replace(options, model_dir=os.path.abspath(options.model_dir))
    output = Path(os.path.abspath(output))
    cases = {case: [Path(os.path.abspath(f)) for f in files] for case, files in cases.items()}
    targets = label_targets(cases, output, output_format=options.output_format)
    model = options.model()
    worker = CaseWorker(options, output)  # the plain loop's worker; with Ray it only proves the model loads
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise MedsegError(f"cannot write here ({error.strerror})", output) from None
    manifest_path = output / MANIFEST
    earlier = read_manifest(manifest_path)
    keys = {case: case_key(files) for case, files in cases.items()}
    rows: dict[str, Row] = {keys[case]: earlier[keys[case]] for case in cases if keys[case] in earlier}
    todo = [c for c in cases if not _done_before(earlier.get(keys[c]), model, targets[c], cases[c])]
    result = BatchResult(skipped=len(cases) - len(todo))
    others = [row for key, row in earlier.items() if key not in rows]  # other inputs' rows stay
    last_write = 0.0

    def record(case: str, status: str, seconds: float, error: str) -> None:
        nonlocal last_write
        row = Row(keys[case], os.path.abspath(targets[case]), status, seconds, error, model)
        rows[row.path] = row
        result.done += status == DONE
        result.failed += status == FAILED
        if on_row is not None:
            on_row(row)
        if time.perf_counter() - last_write > _MANIFEST_EVERY:
            write_manifest(manifest_path, _ordered(rows, keys, others))
            last_write = time.perf_counter()

    try:
        if use_ray:
            del worker
            items = [{"case": c, "files": "\n".join(map(str, cases[c])), "target": str(targets[c])} for c in todo]
            for got in _on_ray(items, options, output, ray_address, workers):
                record(got["case"], got["status"], got["seconds"], got["error"])
                result.peak_mb[got["pid"]] = max(result.peak_mb.get(got["pid"], 0.0), got["peak_mb"])
        else:
            for case in todo:
                record(case, *worker(case, cases[case], targets[case]))
            result.peak_mb[os.getpid()] = peak_memory_mb()
    finally:
        write_manifest(manifest_path, _ordered(rows, keys, others))
        for left in output.glob(".medseg-staging.*"):  # a killed worker's unfinished case
            shutil.rmtree(left, ignore_errors=True)
    result.seconds = time.perf_counter() - started
    return result


def _done_before(row: Row | None, model: str, target: Path, files: Sequence[Path]) -> bool:
    """The row says done with this model, its label map is there, and no input changed after it was written."""
    if row is None or row.status != DONE or row.model != model or row.output != os.path.abspath(target):
        return False
    try:
        written = target.stat().st_mtime_ns
        return all(_newest_mtime(f) <= written for f in files)
    except OSError:
        return False


def _newest_mtime(path: Path) -> int:
    """A file's modification time, or a folder's (a DICOM series) newest file's, in ns."""
    if path.is_dir():
        return max((f.stat().st_mtime_ns for f in path.iterdir() if f.is_file()), default=path.stat().st_mtime_ns)
    return path.stat().st_mtime_ns


def _check_reachable(address: str) -> None:
    """Refuse a ``host:port`` Ray address that does not answer within a few seconds (Ray itself retries for
    minutes); ``auto`` and ``ray://`` addresses are left to Ray."""
    import socket

    host, _, port = address.rpartition(":")
    if address == "auto" or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as error:
        raise MedsegError(f"no Ray cluster answers at {address} ({error.strerror or error})") from None


def _ordered(rows: Mapping[str, Row], keys: Mapping[str, str], others: Sequence[Row]) -> list[Row]:
    """This run's rows in the cases' order, then the rows of inputs of earlier runs not in this one."""
    return [rows[key] for key in keys.values() if key in rows] + list(others)


def cases_per_block(cases: int, workers: int) -> int:
    """Cases in one Ray Data block: small enough that every worker gets several blocks and that a killed worker
    redoes little, large enough that Ray's cost per block stays small next to the cases'."""
    return max(1, min(16, math.ceil(cases / (max(workers, 1) * 8))))


def _on_ray(
    items: list[dict[str, str]],
    options: BatchOptions,
    output: Path,
    address: str | None,
    workers: int | None,
) -> Iterator[dict[str, Any]]:
    """Rows (``case``, ``status``, ``seconds``, ``error``, ``pid``, ``peak_mb``) from a Ray actor pool, as
    their blocks finish."""
    ray = _import_ray()
    if not items:
        return
    started_here = not ray.is_initialized()
    if started_here:
        _start_ray(ray, address, workers)
    try:
        size = min(len(items), workers or max(1, int(ray.cluster_resources().get("CPU", 1))))
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # no INFO lines per dataset run
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
        blocks = math.ceil(len(items) / cases_per_block(len(items), size))
        dataset = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            _RayCases,
            fn_constructor_kwargs={"options": options, "output": str(output)},
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=size),
            num_cpus=1,
        )
        try:
            for got in dataset.iter_rows():
                yield {
                    "case": str(got["case"]),
                    "status": str(got["status"]),
                    "seconds": float(got["seconds"]),
                    "error": str(got["error"]),
                    "pid": int(got["pid"]),
                    "peak_mb": float(got["peak_mb"]),
                }
        except ray.exceptions.RayError as error:
            lines = [line for line in str(error).splitlines() if line.strip()]
            raise MedsegError(f"Ray failed: {lines[-1] if lines else type(error).__name__}") from None
    finally:
        if started_here:
            ray.shutdown()


def _import_ray() -> Any:
    """The ``ray`` module with Ray Data.

    Raises:
        MedsegError: Ray is not installed (`RAY_MISSING`).
    """
    try:
        import ray
        import ray.data  # Ray Data: a part of Ray that may be missing
    except ImportError:
        raise MedsegError(RAY_MISSING) from None
    return ray


def _start_ray(ray: Any, address: str | None, workers: int | None) -> None:
    """Connect to the cluster at ``address``, or start a local one with ``workers`` CPUs (default all)."""
    settings: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    try:
        if address:
            ray.init(address=address, **settings)
        else:
            ray.init(
                num_cpus=workers or os.cpu_count() or 1,
                include_dashboard=False,
                object_store_memory=128 << 20,  # only paths and rows go through it
                **settings,
            )
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f" at {address}" if address else ""
        raise MedsegError(f"cannot start or reach Ray{where}: {' '.join(str(error).split())[:200]}") from None


class _RayCases:
    """The Ray Data actor: a `CaseWorker` built once per actor, fed one case per batch."""

    def __init__(self, options: BatchOptions, output: str) -> None:
        self.worker = CaseWorker(options, output)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        rows: dict[str, list[Any]] = {key: [] for key in ("case", "status", "seconds", "error", "pid", "peak_mb")}
        for case, files, target in zip(batch["case"], batch["files"], batch["target"], strict=True):
            status, seconds, error = self.worker(str(case), str(files).split("\n"), str(target))
            for key, value in zip(
                rows, (str(case), status, seconds, error, os.getpid(), peak_memory_mb()), strict=True
            ):
                rows[key].append(value)
        return rows
