"""Wall time of medseg commands with 1 and 2 CPU threads, and with the thread count medseg picks, on idle cores
and beside busy ones (issue 18: on a busy 2-core machine one thread was 2-3x faster than two).

Each row is one fresh ``medseg`` process (imports and model loads included), as a user runs it:

- ``incontext``: 5 labelled WBC images (``../shared/data/WBC``) segment 3 others (the default engine);
- ``prompt``: a 3D box over the 16 slices of Hippocampus case 093's structures.

"busy" runs ``--burners`` processes that spin on the CPU beside the command (another user's job); they
start 20 s before. ``threads``: ``1``
and ``2`` set ``OMP_NUM_THREADS``; ``auto`` sets nothing, so medseg picks (`medseg.runtime.free_cores`:
the cores idle over 0.1 s). "same output" compares each output's bytes with the 1-thread run of its command and load.

    python benchmarks/threads.py [--data ../shared/data] [--burners 1] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

WARM_UP_S = 20.0


def _spin() -> None:
    while True:
        pass


def commands(data: Path, work: Path) -> dict[str, list[str]]:
    support = work / "wbc_support"
    (support / "images").mkdir(parents=True)
    (support / "masks").mkdir()
    queries = work / "wbc_queries"
    queries.mkdir()
    cases = sorted(p.name.removesuffix("_0000.png") for p in (data / "WBC" / "imagesTr").glob("*_0000.png"))
    for case in cases[:5]:
        shutil.copy(data / "WBC" / "imagesTr" / f"{case}_0000.png", support / "images" / f"{case}.png")
        shutil.copy(data / "WBC" / "labelsTr" / f"{case}.png", support / "masks" / f"{case}.png")
    for case in cases[-3:]:
        shutil.copy(data / "WBC" / "imagesTr" / f"{case}_0000.png", queries / f"{case}.png")
    volume = data / "Hippocampus" / "imagesTr" / "hippocampus_093_0000.nii.gz"
    return {
        "incontext (WBC, 5 supports, 3 queries)": ["incontext", "--support", str(support), "--query", str(queries)],
        "prompt (Hippocampus, 3D box)": ["prompt", str(volume), "--box3d", "6,32,5,26,47,18"],
    }


def run(arguments: list[str], threads: str, out: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MEDSEG_THREADS")}
    if threads != "auto":
        env["OMP_NUM_THREADS"] = threads
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "medseg", *arguments, "-o", str(out)], env=env, capture_output=True)
    if done.returncode != 0:
        raise SystemExit(f"medseg {' '.join(arguments)} failed ({done.returncode}): {done.stderr.decode()[-2000:]}")
    return time.perf_counter() - started


def digest(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    parser.add_argument("--burners", type=int, default=1, help="spinning processes in the busy rows")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import multiprocessing

    table = Table(title="medseg wall time by thread count (median of repeats, fresh process each)")
    for column in ("command", "cores", "load avg at start", "threads", "wall s", "same output as 1 thread"):
        table.add_column(column)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for busy in (False, True):
            burners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.burners if busy else 0)]
            for burner in burners:
                burner.start()
            if busy:
                time.sleep(WARM_UP_S)
            try:
                for name, arguments in commands(args.data, work / f"inputs_{busy}").items():
                    reference: bytes | None = None
                    for threads in ("1", "2", "auto"):
                        load = os.getloadavg()[0]
                        seconds = []
                        for repeat in range(args.repeats):
                            out = work / f"out_{busy}_{threads}_{repeat}_{abs(hash(name))}"
                            seconds.append(run(arguments, threads, out))
                        output = digest(out)
                        reference = output if reference is None else reference
                        state = f"+ {args.burners} busy" if busy else "idle"
                        cores = f"{len(os.sched_getaffinity(0))} {state}"
                        same = "yes" if output == reference else "NO"
                        table.add_row(name, cores, f"{load:.2f}", threads, f"{statistics.median(seconds):.1f}", same)
            finally:
                for burner in burners:
                    burner.terminate()
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
