"""``medseg serve`` in a child process, for the programs that drive a real server (benchmarks, tests, scripts)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
        quiet: discard the server's output (else it is piped: ``process.stdout``).

    Raises:
        MedsegError: the server exited, or did not answer within ``wait`` seconds.
    """
    port = free_port()
    command = [sys.executable, "-m", "medseg.cli", "serve", str(root), "--port", str(port), *options]
    command += ["--token", token] if token else []
    output = subprocess.DEVNULL if quiet else subprocess.PIPE
    process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT if not quiet else subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + wait
        while wait:
            if process.poll() is not None:
                stream = process.stderr if quiet else process.stdout
                said = stream.read().decode(errors="replace").strip() if stream else ""
                raise MedsegError(f"medseg serve exited {process.returncode}: {said[-400:]}", Path(root))
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
