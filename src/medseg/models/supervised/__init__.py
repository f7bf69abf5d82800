"""Supervised segmentation networks (U-Net, V-Net, TransUNet), built by name from a plan's network section."""

from medseg.models.supervised.factory import MODEL_NAMES, NetworkConfig, build_network

__all__ = ["MODEL_NAMES", "NetworkConfig", "build_network"]
