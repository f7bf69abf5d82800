"""Prompt round trips as an annotator sees them: the workbench page in Debian's Chromium, driven by Playwright.

Protocol:

- For each dataset of ``--data`` (default: every one; ``--datasets`` picks), the first ``--images`` images (sorted
  names) of ``imagesTr`` are copied into a temporary workspace (outside the repository; removed at the end) and
  served by a real ``medseg serve`` (``--train-after 0 --no-incontext``: no drafts, prompts only).
- One headless Chromium (WebGL through SwiftShader, no GPU) opens the page and, for each image: opens it from the
  list; draws a box (a mouse drag on the canvas) around the ground truth of the task's first label (from
  ``labelsTr``; on a volume, on the slice where it is largest); then gives ``--clicks`` positive clicks, each on the
  pixel deepest inside the part of the ground truth the current mask misses (or inside the object when none is
  missed).
- Seconds are the page's own (``performance.now``): from sending the prompt to the new label map drawn (request,
  model, response, decoding, drawing). The first box of an image pays for its embedding; the target is the
  prompts after it ("later"): under 1 s on 2D.

Prints one table (per dataset: images, median size, median open seconds, median first-box seconds, median / p90
/ max seconds of the later prompts, share of later prompts under 1 s) and, with ``--screenshots DIR``, saves the
page after the last prompt of each dataset's first image (volumes in the multiplanar view). Run from the
repository root, alone on the machine::

    python benchmarks/page.py --images 4 --clicks 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from medseg.io import load
from medseg.io.formats import split_extension
from medseg.server.background import served

FLAGS = ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--datasets", nargs="*", help="dataset folder names (default: all)")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--clicks", type=int, default=2)
    parser.add_argument("--screenshots", type=Path)
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    names = args.datasets or sorted(p.name for p in args.data.iterdir() if (p / "imagesTr").is_dir())
    from playwright.sync_api import sync_playwright

    rows = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, args=FLAGS)
        try:
            for name in names:
                rows.append(run_dataset(browser, args, args.data / name))
                print(f"done: {name}", file=sys.stderr, flush=True)
        finally:
            browser.close()
    print_table(rows)


def run_dataset(browser: Any, args: argparse.Namespace, dataset: Path) -> dict[str, Any]:
    files = sorted(p for p in (dataset / "imagesTr").iterdir() if not p.name.startswith("."))[: args.images]
    labels = json.loads((dataset / "dataset.json").read_text())["labels"]
    first_label = min(v for v in labels.values() if v > 0)
    folder = Path(tempfile.mkdtemp(prefix="medseg-page-bench-"))
    times: dict[str, list[float]] = {"open": [], "first": [], "later": []}
    sizes: list[str] = []
    try:
        workspace = folder / "ws"
        workspace.mkdir()
        shutil.copyfile(dataset / "dataset.json", workspace / "dataset.json")
        for file in files:
            shutil.copyfile(file, workspace / file.name)
        with served(workspace, "--train-after", "0", "--no-incontext") as (url, _):
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("dialog", lambda dialog: dialog.accept())  # "leave this image unsaved?": yes
            page.goto(url)
            page.wait_for_selector("body[data-ready=yes]", timeout=120_000)
            for index, file in enumerate(files):
                case = split_extension(file)[0].removesuffix("_0000")
                truth = load(next((dataset / "labelsTr").glob(f"{case}.*"))).array == first_label
                sizes.append(" x ".join(str(n) for n in truth.shape[::-1]))
                times["open"].append(open_image(page, case))
                seconds = annotate(page, truth, args.clicks)
                times["first"].append(seconds[0])
                times["later"].extend(seconds[1:])
                if index == 0 and args.screenshots:
                    args.screenshots.mkdir(parents=True, exist_ok=True)
                    page.keyboard.press("4" if truth.ndim == 3 else "1")  # volumes: multiplanar
                    page.screenshot(path=args.screenshots / f"page-{dataset.name}.png")
                    page.keyboard.press("1")
            page.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"dataset": dataset.name, "images": len(files), "size": sizes[len(sizes) // 2], **times}


def open_image(page: Any, case: str) -> float:
    started = page.evaluate("performance.now()")
    page.click(f"#images li[data-id='{case}']")
    page.wait_for_function(f"document.getElementById('image-name').textContent === '{case}'", timeout=120_000)
    page.wait_for_function("!document.body.classList.contains('busy')", timeout=120_000)
    return float(page.evaluate("performance.now()") - started) / 1000


def annotate(page: Any, truth: np.ndarray, clicks: int) -> list[float]:
    """A box around ``truth`` (the slice where it is largest, on a volume), then ``clicks`` positive clicks."""
    z = int(truth.reshape(truth.shape[0], -1).sum(1).argmax()) if truth.ndim == 3 else None
    target = truth[z] if z is not None else truth
    if z is not None:
        page.evaluate("(v) => medseg.showVoxel(v)", [target.shape[1] / 2, target.shape[0] / 2, z])
    rows, cols = np.nonzero(target)
    page.keyboard.press("b")
    seconds = [
        prompt(
            page, lambda: drag(page, screen(page, cols.min(), rows.min(), z), screen(page, cols.max(), rows.max(), z))
        )
    ]
    page.keyboard.press("p")
    for _ in range(clicks):
        shown = np.array(page.evaluate("Array.from(medseg.state.mask)"), np.uint8).reshape(truth.shape)
        missed = target & ((shown[z] if z is not None else shown) == 0)
        region = missed if missed.any() else target
        depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
        y, x = np.unravel_index(int(depth.argmax()), depth.shape)
        seconds.append(prompt(page, lambda x=x, y=y: page.mouse.click(*screen(page, x, y, z))))
    return seconds


def prompt(page: Any, act: Any) -> float:
    """Seconds the page took for one prompt; NaN when it was refused (its one line goes to stderr)."""
    before = int(page.get_attribute("body", "data-updates") or 0)
    page.evaluate("document.getElementById('status').dataset.kind = 'info'")
    act()
    refused = "document.getElementById('status').dataset.kind === 'error'"
    page.wait_for_function(f"Number(document.body.dataset.updates) > {before} || {refused}", timeout=300_000)
    page.wait_for_function("!document.body.classList.contains('busy')", timeout=300_000)
    if page.get_attribute("#status", "data-kind") == "error":
        print(f"refused: {page.text_content('#status')}", file=sys.stderr, flush=True)
        return float("nan")
    return float(page.evaluate("medseg.state.lastSeconds"))


def screen(page: Any, x: float, y: float, z: int | None) -> tuple[float, float]:
    """Page coordinates of voxel (x, y[, z]), kept 1.5 px inside the canvas: the image's edge voxels lie within a
    pixel of the canvas's border when the image fills it, and a drag must start on the canvas."""
    where = page.evaluate("(v) => medseg.screenOf(v)", [float(x), float(y), float(z or 0)])
    rect = page.locator("#viewer").bounding_box()
    inside_x = min(max(float(where[0]), rect["x"] + 1.5), rect["x"] + rect["width"] - 1.5)
    inside_y = min(max(float(where[1]), rect["y"] + 1.5), rect["y"] + rect["height"] - 1.5)
    return inside_x, inside_y


def drag(page: Any, start: tuple[float, float], end: tuple[float, float]) -> None:
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=6)
    page.mouse.up()


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| dataset | images | size (x y [z]) | open s | first box s | later: median s | p90 s | max s | under 1 s "
          "| refused |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        refused = int(np.isnan(row["first"]).sum() + np.isnan(row["later"]).sum())
        first, later = np.asarray(row["first"]), np.asarray(row["later"])
        first, later = first[~np.isnan(first)], later[~np.isnan(later)]
        print(f"| {row['dataset']} | {row['images']} | {row['size']} | {np.median(row['open']):.2f} | "
              f"{np.median(first):.2f} | {np.median(later):.2f} | {np.percentile(later, 90):.2f} | "
              f"{later.max():.2f} | {(later < 1).mean():.0%} | {refused} |")  # fmt: skip


if __name__ == "__main__":
    main()
