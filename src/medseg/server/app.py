"""The workbench's HTTP API (``medseg serve``): thin routes over `Workspace`, `Flywheel` and `SessionStore`.

Everything lives under ``/api/``; with a token, every ``/api/`` request needs ``Authorization: Bearer <token>``
(or ``?token=<token>``). Image ids are looked up in the workspace's listing, never joined to paths.

Masks come back as JSON ``{session_id, image_id, shape, dtype, encoding, labels, interactions}``: ``labels`` is
the label map, ``dtype`` (uint8) values in C order over ``shape`` (numpy order ``(z, y, x)`` / ``(y, x)``),
compressed with zlib and then base64-encoded (``encoding: "zlib+base64"``; in a browser,
``DecompressionStream("deflate")``; in Python, ``np.frombuffer(zlib.decompress(b64decode(s)), np.uint8)``).
``?format=nifti`` gives the label map as ``.nii.gz`` bytes in the image's geometry instead. Images, finished
label maps and drafts are served as ``.nii.gz`` bytes (2D images as 2D NIfTI, RGB as a 3-vector pixel).

Status codes: 401 a missing or wrong token; 404 an unknown image or session; 409 a training request that does
not fit the flywheel's state, an export name in use; 413 a body over the upload cap; 422 bad input (``detail``:
one line); 503 the session cap reached. The prompt and in-context engines are not thread-safe: every engine call
runs under one lock, in FastAPI's threadpool.
"""

from __future__ import annotations

import hmac
import html
import re
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from medseg import __version__
from medseg.errors import MedsegError
from medseg.server.flywheel import Flywheel
from medseg.server.responses import NIFTI, cross_site, mask_response, nifti_response
from medseg.server.schemas import (
    Box3dPrompt,
    BoxPrompt,
    ClickPrompt,
    ExportRequest,
    Prompt,
    PromptBody,
    ScribblePrompt,
    SessionRequest,
    UndoPrompt,
)
from medseg.server.sessions import Session, SessionLimit, SessionStore, UnknownSession
from medseg.server.uploads import parse_label_map
from medseg.server.workspace import UnknownImage, Workspace

MIB = 1024 * 1024
STATIC = Path(__file__).parent / "static"  # the page: index.html, workbench.css and the built workbench.js
EXPORTS_DIR = "exports"  # under the workspace's .medseg/
_EXPORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


# ---- the app -----------------------------------------------------------------------------------------------
def create_app(
    workspace: Workspace,
    flywheel: Flywheel,
    prompt_engine: Any,
    token: str | None = None,
    max_upload_bytes: int = 512 * MIB,
    session_limit: int = 16,
) -> FastAPI:
    """The FastAPI app serving ``workspace`` (routes in the module docstring and at ``/openapi.json``).

    Args:
        workspace: the images and their annotations.
        flywheel: drafts and the specialist's training, on the same workspace.
        prompt_engine: a `medseg.inference.engines.PromptEngine` (boxes and clicks -> masks).
        token: when given, every ``/api/`` request must carry it (``Authorization: Bearer``, or ``?token=``).
        max_upload_bytes: the largest request body (uploaded label maps), bytes.
        session_limit: the most open sessions (idle ones are closed after 30 minutes to make room).
    """
    engine_lock = threading.Lock()  # the engines are not thread-safe: one engine call at a time
    sessions = SessionStore(session_limit)
    app = FastAPI(  # no /docs or /redoc: FastAPI's pages load their scripts from a CDN, and medseg works offline
        title="medseg workbench",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        description=__doc__.split("\n\n", 1)[1] if __doc__ else "",
    )
    app.state.workspace, app.state.flywheel, app.state.sessions = workspace, flywheel, sessions
    expected = token.encode() if token else None

    # ---- safety and errors -----------------------------------------------------------------------------
    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        path = request.url.path
        refused = cross_site(request, expected is not None)
        if refused:  # DNS rebinding (a foreign Host) and cross-site writes (a foreign Origin)
            return JSONResponse({"detail": refused}, 403)
        if expected is not None and (path == "/api" or path.startswith("/api/")):
            given = request.headers.get("authorization", "")
            offered = given[7:].strip() if given[:7].lower() == "bearer " else request.query_params.get("token", "")
            if not hmac.compare_digest(offered.encode(), expected):
                return JSONResponse({"detail": "missing or wrong token (Authorization: Bearer <token>)"}, 401,
                                    headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_upload_bytes:
            return JSONResponse({"detail": _too_large(max_upload_bytes)}, 413)
        return await call_next(request)

    @app.exception_handler(MedsegError)
    async def medseg_error(request: Request, error: MedsegError) -> JSONResponse:
        missing, busy = isinstance(error, UnknownImage | UnknownSession), isinstance(error, SessionLimit)
        code = 404 if missing else 503 if busy else 422
        return JSONResponse({"detail": _one_line(error, workspace.root)}, code)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_line(error)}, 422)

    # ---- pages -----------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home() -> str:
        page = (STATIC / "index.html").read_text(encoding="utf-8")
        return page.replace(
            "<title>medseg workbench</title>", f"<title>medseg: {html.escape(workspace.root.name)}</title>"
        )

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # ---- images ----------------------------------------------------------------------------------------
    @app.get("/api/images")
    def list_images(details: bool = False) -> list[dict[str, Any]]:
        """Every image: ``{id, status}`` (todo | draft | done); with ``details``, also ``shape``, ``ndim`` and
        ``channels`` (reads every image: slow for large workspaces; ``error`` instead for an unreadable one)."""
        listed: list[dict[str, Any]] = []
        for image_id, status in workspace.statuses().items():
            item: dict[str, Any] = {"id": image_id, "status": status}
            if details:
                try:
                    image = workspace.image(image_id)
                    item.update(shape=list(image.shape), ndim=image.ndim, channels=image.channels)
                except MedsegError as error:  # one unreadable image does not hide the others
                    item["error"] = _one_line(error, workspace.root)
            listed.append(item)
        return listed

    @app.get("/api/images/{image_id}/meta")
    def image_meta(image_id: str) -> dict[str, Any]:
        """Shape (numpy order ``(z, y, x)``), channels, dtype, geometry in ITK order (``spacing`` mm and
        ``origin`` mm x first, ``direction`` row-major), status, the kept draft's engine (or null), and whether
        saving writes a DICOM-SEG too (``writes_dicom_seg``: a DICOM series), and the modality (DICOM's
        Modality, else ``dataset.json``'s ``modality``; null when neither says)."""
        image = workspace.image(image_id)
        kept = workspace.draft(image_id) if workspace.status(image_id) == "draft" else None
        return {
            "id": image_id,
            "shape": list(image.shape),
            "ndim": image.ndim,
            "channels": image.channels,
            "dtype": str(image.array.dtype),
            "spacing": list(image.geometry.spacing),
            "origin": list(image.geometry.origin),
            "direction": list(image.geometry.direction),
            "status": workspace.status(image_id),
            "draft_engine": kept[1] if kept is not None else None,
            "writes_dicom_seg": workspace.dicom_seg_path(image_id) is not None,
            "modality": image.meta.get("modality") or workspace.modality,
        }

    @app.get("/api/images/{image_id}", response_class=Response, responses={200: {"content": {NIFTI: {}}}})
    def image_bytes(image_id: str, display: bool = False) -> Response:
        """The image as ``.nii.gz`` bytes in its geometry (``display``: 8-bit RGB as NIfTI RGB24, for viewers)."""
        image = workspace.image(image_id)
        return nifti_response(image, f"{image_id}.nii.gz", rgb24=display)

    @app.get("/api/images/{image_id}/label", response_class=Response, responses={200: {"content": {NIFTI: {}}}})
    def label_bytes(image_id: str) -> Response:
        """The finished label map as ``.nii.gz`` bytes (404 when there is none)."""
        if workspace.status(image_id) != "done":
            raise HTTPException(404, f"image {image_id!r} has no finished label map")
        image = workspace.image(image_id)
        return nifti_response(image.with_array(workspace.label(image_id)), f"{image_id}_label.nii.gz")

    @app.get("/api/images/{image_id}/dicom-seg", response_class=Response,
             responses={200: {"content": {"application/dicom": {}}}})  # fmt: skip
    def dicom_seg_bytes(image_id: str) -> Response:
        """The finished label map as a DICOM Segmentation referencing the image's series (404: not a DICOM
        series, not done, or the workspace writes none: ``--no-dicom-seg``)."""
        path = workspace.dicom_seg_path(image_id)
        if path is None or not path.is_file() or workspace.status(image_id) != "done":
            raise HTTPException(404, f"image {image_id!r} has no DICOM-SEG")
        return FileResponse(path, media_type="application/dicom", filename=f"{image_id}.dcm")

    @app.get("/api/images/{image_id}/draft", response_class=Response, responses={200: {"content": {NIFTI: {}}}})
    def draft_bytes(image_id: str, fresh: bool = False) -> Response:
        """The image's draft as ``.nii.gz`` bytes (the kept one, or computed now by the flywheel's drafter and
        kept; ``fresh``: computed again); header ``X-Medseg-Engine`` names its engine. 404 with the reason
        while there is no drafter (no finished annotation yet)."""
        image = workspace.image(image_id)
        kept = None if fresh else _kept_draft(workspace, image_id)
        if kept is not None:
            labels, engine, seconds = kept[0], kept[1], None
        else:
            if flywheel.drafter is None:
                raise HTTPException(404, "no drafter yet: finish an annotation first (or the in-context engine is off)")
            with engine_lock:
                draft = flywheel.draft(image_id)
            if draft is None:
                raise HTTPException(404, "no draft: the drafter has no support image besides this one")
            labels, engine, seconds = draft.labels, draft.engine, draft.seconds
        headers = {"X-Medseg-Engine": engine}
        if seconds is not None:
            headers["X-Medseg-Seconds"] = f"{seconds:.3f}"
        return nifti_response(image.with_array(labels), f"{image_id}_draft.nii.gz", headers)

    @app.post("/api/images/{image_id}/label")
    async def upload_label(
        image_id: str, request: Request, ext: str | None = Query(None, description="e.g. .nii.gz, .png")
    ) -> dict[str, Any]:
        """Save a finished label map sent as the request body (NIfTI bytes, or any format medseg reads: the
        format is told by the bytes, or by ``ext``); it must fit the image (shape, geometry) and the task."""
        await run_in_threadpool(workspace.entry, image_id)  # 404 before the body is read
        data = await _read_body(request, max_upload_bytes)
        return await run_in_threadpool(_save_upload, image_id, data, ext)

    def _save_upload(image_id: str, data: bytes, ext: str | None) -> dict[str, Any]:
        labels = parse_label_map(workspace, image_id, data, ext)
        path = flywheel.save(image_id, labels)
        return _saved(workspace, flywheel, image_id, path)

    @app.get("/api/task")
    def task() -> dict[str, Any]:
        """The task's labels, name -> value (background 0)."""
        return {"labels": dict(workspace.labels)}

    # ---- sessions --------------------------------------------------------------------------------------
    @app.post("/api/sessions")
    def open_session(body: SessionRequest) -> dict[str, Any]:
        """Open a session: ``{session_id, image_id, start, draft_engine, draft_error, shape, interactions}``;
        ``start`` is ``label`` (the finished label map), ``draft`` or ``empty``."""
        image = workspace.image(body.image_id)
        labels, engine, start, problem = None, None, "empty", None
        if workspace.status(body.image_id) == "done":
            labels, start = workspace.label(body.image_id), "label"
        elif body.use_draft:
            kept = _kept_draft(workspace, body.image_id)
            if kept is None and flywheel.drafter is not None:
                try:
                    with engine_lock:
                        draft = flywheel.draft(body.image_id)
                    kept = None if draft is None else (draft.labels, draft.engine)
                except MedsegError as error:  # e.g. a volume while the supports are 2D: start empty, say why
                    problem = _one_line(error, workspace.root)
            if kept is not None:
                labels, engine, start = kept[0], kept[1], "draft"
        session = sessions.add(Session(body.image_id, image, prompt_engine, labels=labels, draft_engine=engine))
        return {
            "session_id": session.id,
            "image_id": body.image_id,
            "start": start,
            "draft_engine": engine,
            "draft_error": problem,
            "shape": list(image.shape),
            "interactions": 0,
        }

    @app.delete("/api/sessions/{session_id}", status_code=204)
    def close_session(session_id: str) -> Response:
        """Close a session (its unsaved label map is dropped)."""
        sessions.close(session_id)
        return Response(status_code=204)

    @app.get("/api/sessions/{session_id}/labels")
    def session_labels(session_id: str, format: Literal["json", "nifti"] = "json") -> Any:
        """The session's label map so far (the mask format of the module docstring)."""
        session = sessions.get(session_id)
        with engine_lock:
            labels = session.labels.copy()
        return mask_response(session, labels, format)

    @app.post("/api/sessions/{session_id}/prompts")
    def prompt(session_id: str, body: Prompt, format: Literal["json", "nifti"] = "json") -> Any:
        """One prompt (box, box3d, click, scribble, undo) -> the session's label map (see the module docstring).
        Coordinates are voxel indices: ``x`` column, ``y`` row, ``z`` slice."""
        session = sessions.get(session_id)
        if not isinstance(body, UndoPrompt) and body.label not in workspace.labels.values():
            raise MedsegError(f"label {body.label} is not one of the task's labels {workspace.labels}")
        with engine_lock:
            labels = _apply_prompt(session, body).copy()
        return mask_response(session, labels, format)

    @app.put("/api/sessions/{session_id}/labels")
    async def put_labels(
        session_id: str,
        request: Request,
        ext: str | None = Query(None, description="e.g. .nii.gz, .png"),
        format: Literal["json", "nifti"] = "json",
    ) -> Any:
        """Replace the session's label map with an edited one sent as the request body (as for
        ``POST /api/images/{id}/label``); prompts start afresh. Returns the label map."""
        session = sessions.get(session_id)
        data = await _read_body(request, max_upload_bytes)
        return await run_in_threadpool(_put_labels, session, data, ext, format)

    def _put_labels(session: Session, data: bytes, ext: str | None, format: str) -> Any:
        labels = parse_label_map(workspace, session.image_id, data, ext)
        with engine_lock:
            labels = session.set_labels(labels).copy()
        return mask_response(session, labels, format)

    @app.post("/api/sessions/{session_id}/save")
    def save_session(session_id: str) -> dict[str, Any]:
        """Save the session's label map as the image's finished one (atomic; it joins the support set; a
        specialist run may start): ``{path, dicom_seg, status, done, images, training}`` (``path`` relative to
        the workspace; ``dicom_seg`` the DICOM-SEG written beside it for a DICOM series, else null; ``done`` images
        done, ``training`` the specialist's state). The session stays open."""
        session = sessions.get(session_id)
        with engine_lock:
            labels = session.labels.copy()
        path = flywheel.save(session.image_id, labels)
        return _saved(workspace, flywheel, session.image_id, path)

    # ---- the flywheel and export -----------------------------------------------------------------------
    @app.get("/api/flywheel")
    def flywheel_status() -> dict[str, Any]:
        """Images in all and done, the drafter, the specialist's training (state, run, epochs, Dice)."""
        return flywheel.status()

    @app.post("/api/flywheel/train")
    def train() -> dict[str, Any]:
        """Start a specialist run on the done images now (409: one is running, or fewer than 5 are done)."""
        try:
            flywheel.start_training()
        except MedsegError as error:
            raise HTTPException(409, _one_line(error, workspace.root)) from None
        return flywheel.status()

    @app.post("/api/flywheel/cancel")
    def cancel() -> dict[str, Any]:
        """Stop the running specialist run (409 when none is running)."""
        try:
            flywheel.cancel_training()
        except MedsegError as error:
            raise HTTPException(409, _one_line(error, workspace.root)) from None
        return flywheel.status()

    @app.post("/api/export")
    def export(body: ExportRequest) -> dict[str, Any]:
        """The finished annotations as an nnU-Net raw dataset in ``.medseg/exports/<target>``:
        ``{path (relative to the workspace), images}`` (409: that name is in use)."""
        target = _new_target(workspace.state_dir / EXPORTS_DIR, body.target)
        done = len(workspace.done())
        workspace.export(target, name=body.target)
        return {"path": target.relative_to(workspace.root).as_posix(), "images": done}

    @app.post("/api/predictions")
    def predictions(body: ExportRequest) -> dict[str, Any]:
        """Label maps from the current drafter for every image not done, in ``.medseg/predictions/<target>``
        (all written or none): ``{path, images, engine}`` (409: that name is in use)."""
        target = _new_target(workspace.state_dir / "predictions", body.target)
        with engine_lock:
            written = flywheel.predict_remaining(target)
        return {
            "path": target.relative_to(workspace.root).as_posix(),
            "images": len(written),
            "engine": flywheel.drafter,
        }

    return app


# ---- helpers -----------------------------------------------------------------------------------------------
def _new_target(parent: Path, name: str) -> Path:
    """``parent / name`` for a new export or predictions folder.

    Raises:
        MedsegError: ``name`` is not a plain name (422). HTTPException: 409, that folder exists.
    """
    if not _EXPORT_NAME.fullmatch(name) or ".." in name:
        raise MedsegError(f"target must be a name (letters, digits, '._-'), not a path: {name[:80]!r}")
    if (parent / name).exists():
        raise HTTPException(409, f"{parent.name}/{name} exists already; choose another name")
    return parent / name


def _one_line(error: MedsegError, root: Path) -> str:
    """The error as one line; a path inside the workspace is shown relative to it, any other by its name."""
    where = error.path
    if where is not None:
        try:
            shown = where.resolve().relative_to(root).as_posix()
        except (ValueError, OSError):
            shown = where.name
        text = f"{shown}: {error.problem}"
    else:
        text = error.problem
    return " ".join(text.split())


def _validation_line(error: RequestValidationError) -> str:
    """Pydantic's errors as one line: ``box: Tuple should have at most 4 items; ...``."""
    parts = []
    for item in error.errors()[:3]:
        loc = [str(p) for p in item.get("loc", ())]
        where = ".".join(loc[1:] if loc[:1] == ["body"] and len(loc) > 1 else loc)
        parts.append(f"{where or 'body'}: {item.get('msg', 'invalid')}")
    more = len(error.errors()) - 3
    return " ".join(("; ".join(parts) + (f" (+{more} more)" if more > 0 else "")).split())


def _too_large(cap: int) -> str:
    return f"request body over the upload cap of {cap / MIB:g} MiB"


async def _read_body(request: Request, cap: int) -> bytes:
    """The request body, at most ``cap`` bytes (else 413, before or while reading)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > cap:
        raise HTTPException(413, _too_large(cap))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise HTTPException(413, _too_large(cap))
        chunks.append(chunk)
    if not size:
        raise MedsegError("empty request body: send the label map's file bytes")
    return b"".join(chunks)


def _apply_prompt(session: Session, body: PromptBody) -> np.ndarray:
    """Run one prompt on ``session`` (a refused one leaves the session's prompts as they were)."""
    if isinstance(body, BoxPrompt):
        return session.box(body.label, body.box, z=body.z)
    if isinstance(body, Box3dPrompt):
        return session.box3d(body.label, body.box)
    if isinstance(body, ClickPrompt):
        return session.click(body.label, body.x, body.y, body.positive, z=body.z)
    if isinstance(body, ScribblePrompt):
        return session.scribble(body.label, list(body.points), body.positive, z=body.z)
    return session.undo()


def _kept_draft(workspace: Workspace, image_id: str) -> tuple[np.ndarray, str] | None:
    """The kept draft of ``image_id`` checked against the image, or None (none kept, or one that no longer fits)."""
    kept = workspace.draft(image_id)
    if kept is None:
        return None
    try:
        return workspace.check_label(image_id, kept[0]), kept[1]
    except MedsegError:
        return None


def _saved(workspace: Workspace, flywheel: Flywheel, image_id: str, path: Path) -> dict[str, Any]:
    seg = workspace.dicom_seg_path(image_id)
    return {
        "path": path.relative_to(workspace.root).as_posix(),
        "dicom_seg": seg.relative_to(workspace.root).as_posix() if seg is not None and seg.is_file() else None,
        "status": "done",
        "done": len(workspace.done()),
        "images": len(workspace.entries()),
        "training": flywheel.training.state,
    }
