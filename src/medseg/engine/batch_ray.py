"""The Ray side of a batch run (`medseg.engine.batch`): Ray Data's actor pool, and the local Ray started for it.

The inputs' paths go through Ray Data (``from_items(...).map_batches(...)``) to a pool of actors, one CPU each,
each building the runner's predictor once (`medseg.engine.batch.CaseWorker`) and writing the label maps itself:
only paths and rows travel, never volumes. Every node must see the model, the inputs and ``OUT`` at the same
paths (a shared file system) and have medseg installed. Ray restarts a killed actor and runs its block of cases
again; their label maps are rewritten in place, and the driver records each case once.

A local Ray (no address) is started here and stopped at the end. ``RAY_AUTH_MODE=token`` is set for it when the
user has not set it (`local_ray_env`): what a new local Ray does anyway, said explicitly so that Ray does not
announce it on every run. On Linux a watchdog process (`medseg.engine.ray_watchdog`) goes with it, so that a driver
killed with ``kill -9`` leaves no Ray process behind: Ray ends those the driver started, not the two agents the
raylet started, which would otherwise stay for a minute.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg.errors import MedsegError

if TYPE_CHECKING:
    from medseg.engine.batch import CaseRunner


class RayUnavailable(MedsegError):
    """Ray could not be started or reached (nothing was done: the batch run removes what it wrote)."""


RAY_MISSING = "--ray needs Ray, an optional extra: pip install 'medseg[ray]'"
LOCAL_RAY_ENV = {"RAY_AUTH_MODE": "token"}


@contextmanager
def local_ray_env(local: bool) -> Iterator[None]:
    """With ``local`` (a local Ray is to be started) and Ray not imported yet (Ray reads its configuration when
    imported), `LOCAL_RAY_ENV`'s variables that are unset, for the block; the environment as it was after."""
    added = {}
    if local and "ray" not in sys.modules:
        added = {name: value for name, value in LOCAL_RAY_ENV.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def import_ray() -> Any:
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


def check_reachable(address: str) -> None:
    """Refuse a ``host:port`` Ray address that does not answer within a few seconds (Ray itself retries for
    minutes); ``auto`` and ``ray://`` addresses are left to Ray.

    Raises:
        MedsegError: nothing answers at ``address``.
    """
    import socket

    host, _, port = address.rpartition(":")
    if address == "auto" or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as error:
        raise MedsegError(f"no Ray cluster answers at {address} ({error.strerror or error})") from None


def cases_per_block(cases: int, workers: int) -> int:
    """Cases in one Ray Data block: small enough that every worker gets several blocks and that a killed worker
    redoes little, large enough that Ray's cost per block stays small next to the cases'."""
    return max(1, min(16, math.ceil(cases / (max(workers, 1) * 8))))


def ray_rows(
    items: list[dict[str, str]],
    runner: CaseRunner,
    output: Path,
    address: str | None,
    workers: int | None,
    run: str = "",
) -> Iterator[dict[str, Any]]:
    """Rows (``case``, ``status``, ``seconds``, ``error``, ``pid``, ``peak_mb``) from a Ray actor pool, as their
    blocks finish. ``items``: ``case``, ``files`` (newline between them) and ``target`` of each case to do;
    ``run``: the batch run's token (`medseg.engine.batch.CaseWorker`).

    Raises:
        MedsegError: Ray cannot start or be reached, or fails.
    """
    ray = import_ray()
    if not items:
        return
    started_here = not ray.is_initialized()
    if started_here:
        _start_ray(ray, address, workers)
    watchdog = _start_watchdog() if started_here and not address else None
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
            fn_constructor_kwargs={"runner": runner, "output": str(output), "run": run},
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
        if watchdog is not None:
            _stop_watchdog(watchdog)


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
        raise RayUnavailable(f"cannot start or reach Ray{where}: {' '.join(str(error).split())[:200]}") from None


def _start_watchdog() -> subprocess.Popen[bytes] | None:
    """`medseg.engine.ray_watchdog` for this process's local Ray, on Linux (None elsewhere, or if it cannot start)."""
    if not Path("/proc/self/stat").is_file():
        return None
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "medseg.engine.ray_watchdog", str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # outlives a kill of the driver's process group, and Ctrl-C
        )
    except OSError:
        return None


def _stop_watchdog(watchdog: subprocess.Popen[bytes]) -> None:
    """Tell the watchdog that Ray was stopped as it should be, and let it go."""
    from medseg.engine.ray_watchdog import DONE

    try:
        assert watchdog.stdin is not None
        watchdog.stdin.write(DONE)
        watchdog.stdin.close()
        watchdog.wait(timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        watchdog.kill()


class _RayCases:
    """The Ray Data actor: a `CaseWorker` built once per actor, fed one case per batch."""

    def __init__(self, runner: CaseRunner, output: str, run: str = "") -> None:
        from medseg.engine.batch import CaseWorker

        self.worker = CaseWorker(runner, output, run)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        from medseg.engine.batch import peak_memory_mb

        rows: dict[str, list[Any]] = {key: [] for key in ("case", "status", "seconds", "error", "pid", "peak_mb")}
        for case, files, target in zip(batch["case"], batch["files"], batch["target"], strict=True):
            status, seconds, error = self.worker(str(case), str(files).split("\n"), str(target))
            for key, value in zip(
                rows, (str(case), status, seconds, error, os.getpid(), peak_memory_mb()), strict=True
            ):
                rows[key].append(value)
        return rows
