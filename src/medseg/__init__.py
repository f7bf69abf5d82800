"""medseg: medical image segmentation toolkit.

The public face, in the manner of segment-anything's ``sam_model_registry`` and ``SamPredictor``::

    import medseg

    image = medseg.load("scan.nii.gz")
    engine = medseg.PromptEngine.from_pretrained("lite_medsam")          # or medseg.build_engine("lite_medsam")
    labels = engine.predict(image, medseg.Prompts(boxes3d=[(10, 12, 3, 40, 44, 20)])).labels
    medseg.save(labels, "scan_label.nii.gz")

Names are imported on first use (a module ``__getattr__``), so ``import medseg`` and ``medseg --help`` stay fast:
torch, MONAI and SimpleITK load only with the engines that need them.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from medseg.errors import MedsegError

if TYPE_CHECKING:
    from medseg.inference.engines import (
        ENGINES,
        InContextEngine,
        PromptEngine,
        Segmentation,
        SpecialistEngine,
        build_engine,
    )
    from medseg.inference.folders import cases_of, predict_folder
    from medseg.inference.prompt_session import Prompts
    from medseg.io import Geometry, Image, load, save

__version__ = "0.1.0"

_LAZY = {
    "ENGINES": "medseg.inference.engines",
    "InContextEngine": "medseg.inference.engines",
    "PromptEngine": "medseg.inference.engines",
    "Segmentation": "medseg.inference.engines",
    "SpecialistEngine": "medseg.inference.engines",
    "build_engine": "medseg.inference.engines",
    "cases_of": "medseg.inference.folders",
    "predict_folder": "medseg.inference.folders",
    "Prompts": "medseg.inference.prompt_session",
    "Geometry": "medseg.io",
    "Image": "medseg.io",
    "load": "medseg.io",
    "save": "medseg.io",
}

__all__ = [
    "ENGINES",
    "Geometry",
    "Image",
    "InContextEngine",
    "MedsegError",
    "PromptEngine",
    "Prompts",
    "Segmentation",
    "SpecialistEngine",
    "__version__",
    "build_engine",
    "cases_of",
    "load",
    "predict_folder",
    "save",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'medseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
