"""Throughput of batch prediction: ``medseg predict --batch`` (a plain loop) against ``--ray`` (issue 23).

Protocol:

- Inputs are real files made from ``--data`` (``../shared/data``) in a temporary folder (removed at the end, never
  in the repository): ``--images`` 2D images from JSRT (224 x 224 grey X-rays) copied, flipped and transposed
  (eight variants of each), and ``--volumes`` 3D volumes from Hippocampus (MRI, about 35 x 50 x 35) copied and
  flipped along each axis. Every input is its own file with its own name.
- Models: ``medseg plan`` on 10 cases of each dataset, with seeded untrained weights (throughput does not depend
  on what the weights learned); ``--model-2d`` / ``--model-3d`` take trained model folders instead.
- Each configuration runs in a fresh Python process (imports, model loads and Ray's start included in its wall
  time) into its own empty output folder: the plain loop (``run_batch`` in one process, torch on one thread
  and ``OMP_NUM_THREADS=1``: what Ray gives a worker of one CPU), local Ray with 1 and 2 workers (one CPU each;
  the local Ray is started and stopped by the run), and a two-node Ray cluster on loopback: ``ray start --head``
  and a second ``ray start --address`` node, one CPU each, each with its own temporary folder, stopped by their
  process ids at the end; the driver connects by address and runs 2 workers.
- Reported per configuration: wall seconds, cases per second over the wall time, cases per second in steady state
  (from the row of the first 10% of cases to the last row: Ray's start and the actors' model loads left out),
  Ray's overhead against the plain loop for the same CPUs (1 worker against the plain loop), and the peak
  resident memory per worker process (``ru_maxrss``; for the plain loop the whole process).

The machine's load matters (the cores are shared): say what ``uptime`` said before and after. Run from the
repository root::

    python benchmarks/batch.py                       # 1,000 images and 100 volumes
    python benchmarks/batch.py --images 200 --volumes 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# name -> Ray workers (0: the plain loop)
CONFIGS = {"plain loop": 0, "Ray, 1 worker": 1, "Ray, 2 workers": 2, "Ray, 2 nodes x 1 worker": 2}


def make_images(data: Path, folder: Path, count: int) -> None:
    """``count`` 2D images from JSRT: each source image in eight orientations (flips and a transpose)."""
    from medseg.io import load, save

    folder.mkdir(parents=True)
    sources = sorted((data / "JSRT" / "imagesTr").glob("*_0000.png"))
    made = 0
    for variant in range(8):
        for source in sources:
            if made == count:
                return
            image = load(source)
            array = image.array.T if variant & 4 else image.array
            array = np.flip(array, axis=tuple(axis for axis in (0, 1) if variant >> axis & 1))
            save(image.with_array(np.ascontiguousarray(array)), folder / f"{source.name[:-9]}_v{variant}_0000.png")
            made += 1


def make_volumes(data: Path, folder: Path, count: int) -> None:
    """``count`` 3D volumes from Hippocampus: each source volume as it is, then flipped along axis 0, 1, 2."""
    from medseg.io import load, save

    folder.mkdir(parents=True)
    sources = sorted((data / "Hippocampus" / "imagesTr").glob("*_0000.nii.gz"))
    made = 0
    for variant in range(4):
        for source in sources:
            if made == count:
                return
            image = load(source)
            array = image.array if variant == 0 else np.flip(image.array, axis=variant - 1)
            name = f"{source.name[: -len('_0000.nii.gz')]}_v{variant}_0000.nii.gz"
            save(image.with_array(np.ascontiguousarray(array)), folder / name)
            made += 1


def make_model(data: Path, dataset: str, folder: Path) -> Path:
    """``medseg plan`` on 10 cases of ``dataset`` and seeded untrained weights: a model folder."""
    import torch

    from medseg.models.supervised import build_network
    from medseg.planning import read_plan

    subset = folder / f"{dataset}-10"
    for part in ("imagesTr", "labelsTr"):
        (subset / part).mkdir(parents=True)
        for path in sorted((data / dataset / part).iterdir())[:10]:
            shutil.copy(path, subset / part / path.name)
    spec = json.loads((data / dataset / "dataset.json").read_text())
    (subset / "dataset.json").write_text(json.dumps({**spec, "numTraining": 10}))
    model = folder / f"{dataset}-model"
    subprocess.run([sys.executable, "-m", "medseg", "plan", str(subset), "-o", str(model)], check=True)
    torch.manual_seed(0)
    torch.save(build_network(read_plan(model / "plan.json").network).state_dict(), model / "model.pt")
    return model


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration in this process (the child side of `measure`): rows' times, counts and peaks."""
    import torch

    from medseg.engine.batch import run_batch
    from medseg.engine.batch_runners import SpecialistRunner
    from medseg.inference.folders import cases_of

    torch.set_num_threads(1)
    times: list[float] = []
    result = run_batch(
        SpecialistRunner(spec["model"]),
        cases_of(Path(spec["inputs"])),
        Path(spec["output"]),
        use_ray=spec["ray"],
        ray_address=spec.get("address"),
        workers=spec.get("workers"),
        on_row=lambda row: times.append(time.perf_counter()),
    )
    start = times[len(times) // 10] if times else 0.0
    steady = (len(times) - 1 - len(times) // 10) / (times[-1] - start) if len(times) > 10 and times[-1] > start else 0
    return {
        "done": result.done,
        "failed": result.failed,
        "steady": steady,
        "peak_mb": sorted(result.peak_mb.values()),
    }


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run `run_one` in a fresh Python process; its wall time is measured here."""
    started = time.perf_counter()
    env = {**os.environ, **spec.get("env", {})}
    done = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps(spec)], check=True, capture_output=True, text=True, env=env
    )
    seconds = time.perf_counter() - started
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "seconds": seconds}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_cluster(folder: Path, nodes: list[subprocess.Popen[bytes]]) -> str:
    """A head and a second node on loopback, one CPU each, each with its own temporary folder, added to ``nodes``
    as they start (so that a failed start still stops them); Ray's token authentication on
    (``RAY_AUTH_MODE=token``: the token ``ray start --head`` uses, from ``~/.ray``). Returns the address."""
    ray = str(Path(sys.executable).with_name("ray"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus", "1", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1"]
    common += ["--object-store-memory", str(200 << 20)]  # only paths and rows go through it
    starts = {
        "head": [ray, "start", "--head", "--port", str(port), "--include-dashboard", "false"],
        "node": [ray, "start", "--address", address],
    }
    for name, command in starts.items():
        (folder / name).mkdir(parents=True)
        log = open(folder / f"{name}.log", "wb")  # noqa: SIM115 (the node writes it while it runs)
        nodes.append(
            subprocess.Popen(
                [*command, "--temp-dir", str(folder / name), *common],
                env={**os.environ, "TMPDIR": str(folder / name), "RAY_AUTH_MODE": "token"},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped by id (`stop_cluster`)
            )
        )
        try:
            wait_for_cpus(address, len(nodes))
        except subprocess.CalledProcessError:
            sys.exit(f"the Ray {name} did not start; its log:\n{(folder / f'{name}.log').read_text()[-3000:]}")
    return address


def wait_for_cpus(address: str, cpus: int) -> None:
    """Wait (up to two minutes) until the cluster at ``address`` has ``cpus`` CPUs."""
    probe = (
        "import ray, time, sys\n"
        "deadline = time.time() + 120\n"
        "while True:\n"
        "    try:\n"
        f"        ray.init(address='{address}', log_to_driver=False); break\n"
        "    except Exception:\n"
        "        if time.time() > deadline: raise\n"
        "        time.sleep(1)\n"
        f"while ray.cluster_resources().get('CPU', 0) < {cpus} and time.time() < deadline: time.sleep(1)\n"
        f"sys.exit(ray.cluster_resources().get('CPU', 0) < {cpus})\n"
    )
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, env=env)


def stop_cluster(nodes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to each node's own process group (``ray start --block`` drains for up to 30 s, then stops what it
    started), the second node first; SIGKILL to the group if it is still there after 45 s."""
    for node in reversed(nodes):
        try:
            os.killpg(node.pid, signal.SIGTERM)
            node.wait(timeout=45)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()
        except ProcessLookupError:
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="2D images (JSRT, 224 x 224)")
    parser.add_argument("--volumes", type=int, default=100, help="3D volumes (Hippocampus)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--model-2d", type=Path, help="a trained 2D grey model folder (default: planned, untrained)")
    parser.add_argument("--model-3d", type=Path, help="a trained 3D one-channel model folder")
    parser.add_argument("--configs", default=",".join(str(i) for i in range(len(CONFIGS))), help="indices to run")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    chosen = [list(CONFIGS)[int(i)] for i in args.configs.split(",")]
    root = Path(tempfile.mkdtemp(prefix="medseg-batch-bench."))
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        sets = []
        if args.images:
            make_images(args.data, root / "images", args.images)
            sets.append(("2D images", root / "images", args.model_2d or make_model(args.data, "JSRT", root)))
        if args.volumes:
            make_volumes(args.data, root / "volumes", args.volumes)
            sets.append(("3D volumes", root / "volumes", args.model_3d or make_model(args.data, "Hippocampus", root)))
        results: dict[tuple[str, str], dict[str, Any]] = {}
        for config in chosen:
            address = None
            if "nodes" in config:
                # a short folder: Ray's Unix sockets live under it, and their paths may not pass 107 characters
                cluster = Path(tempfile.mkdtemp(prefix="medseg-ray."))
                address = start_cluster(cluster, nodes)
            for name, inputs, model in sets:
                spec: dict[str, Any] = {"model": str(model), "inputs": str(inputs)}
                spec["output"] = str(root / "out" / f"{name}-{config}")
                if config != "plain loop":
                    spec.update(ray=True, workers=CONFIGS[config], address=address)
                    spec.update(env={"RAY_AUTH_MODE": "token"} if address else {})
                else:  # one thread for torch and for numpy's and scipy's libraries, as Ray gives a 1-CPU worker
                    spec.update(ray=False, env={"OMP_NUM_THREADS": "1"})
                results[name, config] = measure(spec)
                print(f"{name}, {config}: {results[name, config]}", file=sys.stderr, flush=True)
            if nodes:
                stop_cluster(nodes)
                nodes = []
                shutil.rmtree(cluster, ignore_errors=True)
        print_table(sets, chosen, results)
    finally:
        stop_cluster(nodes)
        shutil.rmtree(root, ignore_errors=True)


def print_table(sets: list[tuple[str, Path, Path]], chosen: list[str], results: dict[tuple[str, str], Any]) -> None:
    header = (
        "| inputs | run | cases | failed | wall s | cases/s | steady cases/s | overhead vs plain | peak MB per worker |"
    )
    print(header)
    print("|---|---|---:|---:|---:|---:|---:|---|---|")
    for name, _, _ in sets:
        plain = results.get((name, "plain loop"))
        for config in chosen:
            r = results[name, config]
            cases = r["done"] + r["failed"]
            rate = cases / r["seconds"]
            overhead = "-"
            if plain and config == "Ray, 1 worker":
                plain_rate = (plain["done"] + plain["failed"]) / plain["seconds"]
                steady_over = plain["steady"] / r["steady"] - 1 if r["steady"] else float("nan")
                overhead = f"{plain_rate / rate - 1:+.0%} wall, {steady_over:+.0%} steady"
            peaks = ", ".join(f"{p:.0f}" for p in r["peak_mb"])
            print(
                f"| {name} | {config} | {cases} | {r['failed']} | {r['seconds']:.1f} | {rate:.2f} | "
                f"{r['steady']:.2f} | {overhead} | {peaks} |"
            )


if __name__ == "__main__":
    main()
