"""Build a supervised network by name from a `NetworkConfig` (the ``network`` section of ``plan.json``).

| name      | source                          | dims  | built with                                   |
|-----------|---------------------------------|-------|----------------------------------------------|
| unet      | nnU-Net (Isensee et al. 2021)   | 2D/3D | MONAI ``DynUNet`` (conv-IN-LeakyReLU stages) |
| vnet      | V-Net (Milletari et al. 2016)   | 2D/3D | `medseg.models.supervised.vnet.VNet`         |
| transunet | TransUNet (Chen et al. 2021)    | 2D    | `medseg.models.supervised.transunet.TransUNet` |

``backbone: litemedsam`` (unet, 2D) replaces the U-Net's encoder by LiteMedSAM's pretrained TinyViT
(`medseg.models.supervised.litemedsam_unet`); `build_network` builds it untrained, training loads the weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import nn

from medseg.errors import MedsegError

MODEL_NAMES = ("unet", "vnet", "transunet")
BACKBONES = ("plain", "litemedsam")
LITEMEDSAM_DECODERS = ("light", "full")  # `LiteMedSAMUNet`'s


@dataclass
class NetworkConfig:
    """Everything that fixes a network's parameters; plain data that round-trips through JSON.

    ``strides`` lists one stride per down-sampling step and axis (array order), e.g. ``[[2, 2], [2, 2]]``;
    its length is the network depth. ``kernel_sizes`` has one entry per stage (``len(strides) + 1``).
    """

    name: str
    spatial_dims: int
    in_channels: int
    out_channels: int  # background included
    strides: list[list[int]]
    kernel_sizes: list[list[int]]
    base_features: int = 32
    max_features: int = 320
    deep_supervision: bool = False
    # TransUNet: ViT on the bottleneck tokens.
    vit_layers: int = 4
    vit_heads: int = 4
    patch_size: list[int] | None = None  # TransUNet's token grid (position embeddings) is sized from it
    backbone: str = "plain"  # "litemedsam": LiteMedSAM's TinyViT as the U-Net's encoder
    freeze_encoder: bool = True  # litemedsam: keep the pretrained encoder fixed
    decoder: str = "light"  # litemedsam: "light" or "full" (`LiteMedSAMUNet`; plans without the key: "full")
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetworkConfig:
        """Inverse of `to_dict`. Raises MedsegError on unknown or missing keys."""
        if not isinstance(data, dict):
            raise MedsegError(f"network section must be a mapping, got {type(data).__name__}")
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise MedsegError(f"network section has unknown keys {unknown} (allowed: {sorted(allowed)})")
        if data.get("backbone") == "litemedsam" and "decoder" not in data:
            data = {**data, "decoder": "full"}  # written before the light decoder: the weights are the full one's
        try:
            return cls(**data)
        except TypeError as error:
            raise MedsegError(f"network section incomplete: {error}") from None

    def features(self) -> list[int]:
        """Channels per stage: doubling from ``base_features``, capped at ``max_features`` (nnU-Net)."""
        return [min(self.base_features * 2**i, self.max_features) for i in range(len(self.strides) + 1)]


def build_network(config: NetworkConfig) -> nn.Module:
    """The network a config describes; its forward takes ``(B, in_channels, *spatial)`` and returns logits
    ``(B, out_channels, *spatial)`` (in training mode with deep supervision, ``(B, S, out_channels,
    *spatial)``: S outputs, all up-sampled to full size, as MONAI's ``DynUNet`` returns them).

    Raises:
        MedsegError: unknown name, a 3D TransUNet, or an inconsistent config.
    """
    check_config(config)
    if config.backbone == "litemedsam":
        from medseg.models.supervised.litemedsam_unet import LiteMedSAMUNet

        return LiteMedSAMUNet(config.in_channels, config.out_channels, config.freeze_encoder, decoder=config.decoder)
    if config.name == "unet":
        from monai.networks.nets import DynUNet

        return DynUNet(
            spatial_dims=config.spatial_dims,
            in_channels=config.in_channels,
            out_channels=config.out_channels,
            kernel_size=config.kernel_sizes,
            strides=[[1] * config.spatial_dims, *config.strides],
            upsample_kernel_size=config.strides,
            filters=config.features(),
            norm_name=("INSTANCE", {"affine": True}),
            act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
            deep_supervision=config.deep_supervision,
            deep_supr_num=max(1, min(2, len(config.strides) - 1)),
        )
    if config.name == "vnet":
        from medseg.models.supervised.vnet import VNet

        return VNet(config.spatial_dims, config.in_channels, config.out_channels, config.strides, config.features())
    from medseg.models.supervised.transunet import TransUNet

    return TransUNet(
        config.in_channels,
        config.out_channels,
        widths=config.features(),
        vit_layers=config.vit_layers,
        vit_heads=config.vit_heads,
        patch_size=config.patch_size,
    )


def check_config(config: NetworkConfig) -> None:
    """Raise MedsegError when ``config`` cannot build a network (see `build_network`)."""
    if config.name not in MODEL_NAMES:
        raise MedsegError(f"unknown model {config.name!r} (known: {', '.join(MODEL_NAMES)})")
    if config.backbone not in BACKBONES:
        raise MedsegError(f"unknown backbone {config.backbone!r} (known: {', '.join(BACKBONES)})")
    if config.backbone == "litemedsam" and (config.name != "unet" or config.spatial_dims != 2):
        raise MedsegError("--backbone litemedsam is a 2D U-Net's encoder (LiteMedSAM's TinyViT sees 2D images)")
    if config.backbone == "litemedsam" and config.decoder not in LITEMEDSAM_DECODERS:
        raise MedsegError(f"unknown decoder {config.decoder!r} (known: {', '.join(LITEMEDSAM_DECODERS)})")
    if config.backbone == "litemedsam" and config.in_channels not in (1, 3):
        raise MedsegError(f"--backbone litemedsam takes grey or RGB images, not {config.in_channels} channels")
    if config.spatial_dims not in (2, 3):
        raise MedsegError(f"spatial_dims must be 2 or 3, got {config.spatial_dims}")
    if config.name == "transunet" and config.spatial_dims != 2:
        raise MedsegError("TransUNet is a 2D network (Chen et al. 2021); use unet or vnet for 3D data")
    if not config.strides or any(len(s) != config.spatial_dims for s in config.strides):
        raise MedsegError(f"strides must be a non-empty list of {config.spatial_dims}-element lists")
    if len(config.kernel_sizes) != len(config.strides) + 1:
        raise MedsegError("kernel_sizes needs one entry per stage (len(strides) + 1)")
    if not all(isinstance(v, int) and v >= 1 for row in [*config.strides, *config.kernel_sizes] for v in row):
        raise MedsegError("strides and kernel_sizes must hold positive integers")
    if config.in_channels < 1 or config.out_channels < 2:
        raise MedsegError("a network needs at least one input channel and two output classes")
    if config.name == "transunet" and any(s != [2, 2] for s in config.strides):
        raise MedsegError("TransUNet halves both axes at every step: strides must all be [2, 2]")
    if config.name == "transunet" and config.vit_heads and config.features()[-1] % config.vit_heads:
        raise MedsegError("TransUNet: the bottleneck width must be divisible by vit_heads")
