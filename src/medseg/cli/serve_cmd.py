"""``medseg serve WORKSPACE``: the annotation workbench's HTTP API (prompts, drafts, the flywheel) on a folder."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import typer

from medseg.cli.common import check_device, out, user_errors
from medseg.errors import MedsegError
from medseg.runtime import limit_malloc_arenas

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@user_errors
def serve(
    workspace: Path = typer.Argument(
        ..., metavar="WORKSPACE", help="Folder of images to annotate (or nnU-Net's imagesTr layout)."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; beyond loopback needs --token."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="Port to listen on."),
    token: str | None = typer.Option(
        None, "--token", envvar="MEDSEG_TOKEN", help="Every /api/ request must carry it (Authorization: Bearer)."
    ),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or mps (engines and the specialist)."),
    train_after: int = typer.Option(20, "--train-after", min=0, help="Done images that start a specialist (0: never)."),
    train_minutes: float = typer.Option(10.0, "--train-minutes", min=0.01, help="Each specialist run's budget."),
    session_limit: int = typer.Option(16, "--session-limit", min=1, help="The most open annotation sessions."),
    max_upload_mb: float = typer.Option(512.0, "--max-upload-mb", min=0.001, help="Largest upload (label map), MiB."),
    no_incontext: bool = typer.Option(False, "--no-incontext", help="No in-context drafts from finished images."),
    embedding_cache: int = typer.Option(
        64, "--embedding-cache", min=1, help="Image embeddings (2D images or slices) kept, 4 MB each."
    ),
    dicom_seg: bool = typer.Option(
        True, "--dicom-seg/--no-dicom-seg", help="Also save a DICOM series' label map as dicom-seg/<id>.dcm."
    ),
) -> None:
    """Serve WORKSPACE for annotation: prompts (LiteMedSAM), in-context drafts from the finished images, a
    specialist trained in the background, export as an nnU-Net dataset. The API is described at /openapi.json."""
    if host not in LOOPBACK and not token:
        raise MedsegError(f"--host {host} serves beyond this machine: give --token (or set MEDSEG_TOKEN)")
    check_device(device)
    _check_free(host, port)
    limit_malloc_arenas(1)  # requests run on many threads: one arena keeps the retained heap bounded
    import uvicorn

    from medseg.inference.engines import InContextEngine, PromptEngine
    from medseg.server.app import MIB, create_app
    from medseg.server.flywheel import Flywheel
    from medseg.server.workspace import Workspace

    space = Workspace(workspace, dicom_seg=dicom_seg)
    prompt_engine = PromptEngine.from_pretrained(device=device)
    prompt_engine.predictor.cache_size = embedding_cache  # the bulk of the server's memory: 4 MB an embedding
    incontext = None if no_incontext else InContextEngine.from_pretrained("probe", device=device)
    flywheel = Flywheel(space, incontext, train_after=train_after, train_minutes=train_minutes, device=device,
                        prompt_engine=prompt_engine)  # fmt: skip
    flywheel.resume_training()  # a run the last server left going continues
    app = create_app(space, flywheel, prompt_engine, token=token, max_upload_bytes=int(max_upload_mb * MIB),
                     session_limit=session_limit)  # fmt: skip
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"
    entries = space.entries()
    out.print(f"medseg serve: {len(entries)} image(s), {len(space.done())} done, in {space.root}", soft_wrap=True)
    if not entries:
        out.print("no images medseg reads in this folder yet (images added while serving appear)", soft_wrap=True)
    page = f"{url}?token={quote(token)}" if token else url  # the page keeps the token for its API calls
    out.print(f"open {page} (API: {url}openapi.json{'; /api/ needs the token' if token else ''}); Ctrl-C stops",
              soft_wrap=True)  # fmt: skip
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:  # a training child must not outlive the server; the next start resumes it
        flywheel.stop()


def _check_free(host: str, port: int) -> None:
    """Refuse, in one line, an address this process cannot listen on (in use, not this machine's).

    Raises:
        MedsegError: the address cannot be bound.
    """
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as error:
        raise MedsegError(f"cannot listen on {host}:{port} ({error.strerror or error})") from None
