"""medseg: medical image segmentation toolkit.

Heavy modules (torch, MONAI, SimpleITK) are imported by the submodules that need them, so that
``import medseg`` and ``medseg --help`` stay fast.
"""

from medseg.errors import MedsegError

__all__ = ["MedsegError", "__version__"]
__version__ = "0.1.0"
