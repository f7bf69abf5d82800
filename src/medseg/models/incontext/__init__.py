"""In-context segmentation networks: a support set of (image, mask) pairs defines the task at inference."""

from medseg.models.incontext.universeg import UniverSeg, universeg_v1

__all__ = ["UniverSeg", "universeg_v1"]
