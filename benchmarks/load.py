"""Load test of ``medseg serve``: concurrent annotators sending box and click prompts over HTTP.

Protocol:

- ``--images`` images (sorted names) of ``--dataset``'s ``imagesTr`` are copied into a temporary workspace
  (outside the repository; removed at the end) and served by a real ``medseg serve`` subprocess on a free
  loopback port (``--train-after 0``: no specialist; ``--no-incontext``: sessions start empty).
- ``--clients`` threads, each with its own httpx client and its own session on image ``client % images``, send
  ``--requests`` prompts each: a box around the ground truth's bounding box (from ``labelsTr``; the image's
  middle half without one) every fifth request, else a positive click on a random foreground pixel (seeded).
  The first prompt of a session pays for the image's embedding; the engines run one at a time (one lock).
- Latency is wall clock per request at the client, response decoded as JSON. Peak RSS is the server process's
  ``VmHWM`` (``/proc/<pid>/status``) at the end; the memory cap is what the server is configured to keep: the
  embedding cache (``--embedding-cache`` embeddings x 4 MB) plus the prompt model's parameters.

Prints one table: requests, errors, p50 / p95 / max latency (ms), throughput (requests/s), server RSS at start
and peak (MB), the embedding cache plus model (MB), and whether the peak stayed under ``--max-rss-mb`` (the cap
medseg states for the server, models, torch, the embedding cache and the allocator's retained heap included;
exit status 1 when it did not, or when a request failed). Run from the repository root, alone on the machine::

    python benchmarks/load.py --clients 8 --requests 50
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError
from medseg.io import load
from medseg.io.formats import split_extension
from medseg.server.background import served

EMBEDDING_MB = 4.0  # one LiteMedSAM embedding: 256 x 64 x 64 float32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=50, help="prompts per client")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--dataset", type=Path, default=Path("../shared/data/Kvasir-SEG"))
    parser.add_argument("--embedding-cache", type=int, default=64, help="medseg serve --embedding-cache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-rss-mb", type=float, default=1500.0, help="The server's peak RSS must stay under this (exit 1 if not)."
    )
    args = parser.parse_args()
    if args.clients < 1 or args.requests < 1 or args.images < 1:
        parser.error("--clients, --requests and --images must be at least 1")
    files = sorted((args.dataset / "imagesTr").glob("*_0000.*"))[: args.images]
    if not files:
        parser.error(f"no images in {args.dataset / 'imagesTr'}")

    folder = Path(tempfile.mkdtemp(prefix="medseg-load-"))
    try:
        workspace = folder / "workspace"
        workspace.mkdir()
        targets = []
        for file in files:
            shutil.copyfile(file, workspace / file.name)
            case = split_extension(file)[0].removesuffix("_0000")
            targets.append((case, _foreground(args.dataset / "labelsTr", case, file)))
        run(args, workspace, targets)
    except MedsegError as error:  # the server did not start
        raise SystemExit(str(error)) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _foreground(labels_dir: Path, case: str, image_file: Path) -> np.ndarray:
    """The ground truth's foreground ``(y, x)`` of ``case`` (the image's middle half when it has no label)."""
    found = sorted(labels_dir.glob(f"{case}.*"))
    if found:
        mask = load(found[0]).array > 0
    else:
        shape = load(image_file).shape
        mask = np.zeros(shape, bool)
        mask[shape[0] // 4 : 3 * shape[0] // 4, shape[1] // 4 : 3 * shape[1] // 4] = True
    return mask


def run(args: argparse.Namespace, workspace: Path, targets: list[tuple[str, np.ndarray]]) -> None:
    import httpx

    options = ["--train-after", "0", "--no-incontext", "--embedding-cache", str(args.embedding_cache),
               "--session-limit", str(max(16, args.clients))]  # fmt: skip
    with served(workspace, *options) as (url, server):
        start_rss = _memory_mb(server.pid, "VmRSS")
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()

        def client(index: int) -> None:
            case, mask = targets[index % len(targets)]
            rows, cols = np.nonzero(mask)
            box = [float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)]
            rng = np.random.default_rng(args.seed + index)
            with httpx.Client(base_url=url, timeout=600) as http:
                session = http.post("/api/sessions", json={"image_id": case, "use_draft": False}).json()["session_id"]
                for k in range(args.requests):
                    if k % 5 == 0:
                        body: dict[str, Any] = {"type": "box", "box": box}
                    else:
                        pick = int(rng.integers(rows.size))
                        body = {"type": "click", "x": float(cols[pick]), "y": float(rows[pick]), "positive": True}
                    started = time.perf_counter()
                    response = http.post(f"/api/sessions/{session}/prompts", json=body)
                    response.json()
                    seconds = time.perf_counter() - started
                    with lock:
                        latencies.append(seconds)
                        if response.status_code != 200:
                            errors.append(f"{response.status_code} {response.text[:120]}")
                http.delete(f"/api/sessions/{session}")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - began
        peak = _memory_mb(server.pid, "VmHWM")
    cap = args.embedding_cache * EMBEDDING_MB + _model_mb()
    ms = np.asarray(latencies) * 1000.0
    rows_out = [
        ("clients x requests", f"{args.clients} x {args.requests} on {len(targets)} images"),
        ("requests", str(len(latencies))),
        ("errors", str(len(errors)) + (f" (first: {errors[0]})" if errors else "")),
        ("p50 latency (ms)", f"{np.percentile(ms, 50):.0f}"),
        ("p95 latency (ms)", f"{np.percentile(ms, 95):.0f}"),
        ("max latency (ms)", f"{ms.max():.0f}"),
        ("throughput (requests/s)", f"{len(latencies) / wall:.1f}"),
        ("server RSS at start (MB)", f"{start_rss:.0f}"),
        ("server peak RSS, VmHWM (MB)", f"{peak:.0f}"),
        ("embedding cache + prompt model (MB)", f"{cap:.0f} = {args.embedding_cache} x {EMBEDDING_MB:g} MB + model"),
        ("stated cap on peak RSS (MB)", f"{args.max_rss_mb:.0f}: {'held' if peak <= args.max_rss_mb else 'EXCEEDED'}"),
        ("cpu cores", str(os.cpu_count())),
    ]
    width = max(len(name) for name, _ in rows_out)
    print(f"| {'measure'.ljust(width)} | value |\n|{'-' * (width + 2)}|-------|")
    for name, value in rows_out:
        print(f"| {name.ljust(width)} | {value} |")
    if errors or peak > args.max_rss_mb:
        sys.exit(1)


def _memory_mb(pid: int, field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of process ``pid`` in MB (Linux ``/proc``; NaN elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _model_mb() -> float:
    """The prompt model's parameters and buffers, MB (as the server holds them, float32 on the CPU)."""
    from medseg.inference.engines import PromptEngine

    model = PromptEngine.from_pretrained().predictor.model
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 1e6


if __name__ == "__main__":
    main()
