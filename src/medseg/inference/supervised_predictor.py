"""`SupervisedPredictor`: a trained supervised model folder (``plan.json`` + ``model.pt``) applied to images
of any size, returned on the input's own grid (resampled back, nnU-Net style: probabilities first)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medseg.errors import MedsegError
from medseg.inference.sliding_window import predict_probabilities
from medseg.io import Image
from medseg.models.supervised import build_network
from medseg.planning import Plan, read_plan
from medseg.preprocessing import check_preset_fits
from medseg.preprocessing.network_input import prepare_image
from medseg.preprocessing.resample import invert_resample
from medseg.runtime import tune_allocator

WEIGHTS = "model.pt"


@dataclass
class Prediction:
    """``labels`` ``(*spatial)`` uint8 and ``probabilities`` ``(K, *spatial)`` float32 on the input's grid."""

    labels: np.ndarray
    probabilities: np.ndarray


class SupervisedPredictor:
    """Loads ``MODEL_DIR/plan.json`` and ``MODEL_DIR/model.pt`` (written by ``medseg train``).

    Raises:
        MedsegError: missing or invalid plan, a missing, corrupt or mismatched checkpoint (weights of another
            network or another plan).
    """

    def __init__(self, model_dir: str | Path, device: str = "cpu") -> None:
        tune_allocator()
        folder = Path(model_dir)
        if not folder.is_dir():
            raise MedsegError("no such model folder (expected the -o folder of 'medseg train')", folder)
        self.plan: Plan = read_plan(folder / "plan.json")
        self.device = torch.device(device)
        self.network = build_network(self.plan.network)
        weights = folder / WEIGHTS
        if not weights.is_file():
            raise MedsegError(f"no {WEIGHTS} (has training written its first epoch?)", folder)
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as error:  # corrupt or truncated files raise many types
            raise MedsegError(f"cannot read checkpoint ({type(error).__name__})", weights) from None
        if not isinstance(state, dict):
            raise MedsegError("not a state_dict", weights)
        try:
            self.network.load_state_dict(state, strict=True)
        except RuntimeError as error:
            lines = [ln.strip() for ln in str(error).splitlines() if ln.strip() and not ln.strip().endswith(":")]
            first = (lines[0] if lines else str(error))[:200]
            raise MedsegError(
                f"checkpoint does not fit plan.json's network ({self.plan.network.name}, "
                f"{self.plan.spatial_dims}D): {first}",
                weights,
            ) from None
        self.network.to(self.device).eval()

    def check(self, image: Image) -> None:
        """Raise MedsegError (naming the image's file) when it cannot go through this model."""
        where = image.meta.get("path")
        if image.ndim != self.plan.spatial_dims:
            raise MedsegError(
                f"{image.ndim}D image, but the model was trained on {self.plan.spatial_dims}D images", where
            )
        if image.channels != self.plan.channels:
            raise MedsegError(f"{image.channels} channel(s), but the model expects {self.plan.channels}", where)
        check_preset_fits(image, self.plan.intensity_preset())  # a CT model's window on an 8-bit image: refused

    def predict(self, image: Image, mirror: bool = False) -> Prediction:
        """Segment ``image`` (2D/3D as the plan; channels as the plan).

        Args:
            mirror: average over mirrored copies along the plan's mirror axes (test-time augmentation;
                2^n forward passes).

        Raises:
            MedsegError: as `check`.
        """
        self.check(image)
        array, record = prepare_image(image, self.plan.intensity_preset(), self.plan.target_spacing)
        probabilities = (
            predict_probabilities(
                self.network,
                torch.from_numpy(array).to(self.device),
                self.plan.patch_size,
                self.plan.mirror_axes if mirror else (),
                batch_size=self.plan.training.batch_size,
            )
            .cpu()
            .numpy()
        )
        if record is not None:
            grid = image.with_array(np.moveaxis(probabilities, 0, -1), channels=probabilities.shape[0])
            back = invert_resample(grid, record, is_label=False).array
            probabilities = np.moveaxis(back, -1, 0) if back.ndim > image.ndim else back[None]
        labels = probabilities.argmax(0).astype(np.uint8)
        return Prediction(labels, probabilities.astype(np.float32))
