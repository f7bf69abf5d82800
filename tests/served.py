"""A real ``medseg serve`` in a child process for the tests that talk to it over HTTP (the API and the page)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def served(
    root: Path, *options: str, token: str | None = None, wait: bool = True
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``medseg serve root`` on a free loopback port: ``(url, process)``; with ``wait``, once it answers."""
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "medseg.cli", "serve", str(root), "--port", str(port), *options]
    command += ["--token", token] if token else []
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while wait:
            assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
            try:
                httpx.get(f"{url}/", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "medseg serve did not answer within 90 s"
                time.sleep(0.3)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
