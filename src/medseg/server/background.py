"""``medseg serve`` in a child process, for the programs that drive a real server (benchmarks, tests, scripts)."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx

from medseg.errors import MedsegError


def free_port() -> int:
    """A TCP port free on the loopback interface now (another process may still take it before you do)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def served(
    root: str | Path, *options: str, token: str | None = None, wait: float = 120.0, quiet: bool = True
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start ``medseg serve root [options]`` on a free loopback port; yield ``(url, process)``; stop it at exit.

    Args:
        root: the workspace folder.
        options: further ``medseg serve`` options, e.g. ``"--train-after", "0"``.
        token: the API token (``--token``).
        wait: seconds to wait for the server to answer (0: yield at once).
        quiet: keep the server's output to itself, shown only if it exits early (else it is piped:
            ``process.stdout``).

    Raises:
        MedsegError: the server exited, or did not answer within ``wait`` seconds.
    """
    port = free_port()
    command = [sys.executable, "-m", "medseg.cli", "serve", str(root), "--port", str(port), *options]
    command += ["--token", token] if token else []
    # quiet: the output goes to a file (an unread pipe would block a talkative server), read back if it fails
    with tempfile.TemporaryFile() as log_file:
        yield from _run(command, f"http://127.0.0.1:{port}", log_file if quiet else None, root, wait)


def _run(
    command: list[str], url: str, log: IO[bytes] | None, root: str | Path, wait: float
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    output = log if log is not None else subprocess.PIPE
    process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + wait
        while wait:
            if process.poll() is not None:
                said = _output(process, log)[-400:]
                raise MedsegError(f"medseg serve exited {process.returncode}: {said}", Path(root))
            try:
                httpx.get(f"{url}/", timeout=5)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise MedsegError(f"medseg serve did not answer within {wait:.0f} s", Path(root)) from None
                time.sleep(0.3)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _output(process: subprocess.Popen[bytes], log: IO[bytes] | None) -> str:
    """What a server that has exited printed (from its log file, or its pipe)."""
    if log is not None:
        log.seek(0)
    stream = log if log is not None else process.stdout
    return stream.read().decode(errors="replace").strip() if stream is not None else ""
