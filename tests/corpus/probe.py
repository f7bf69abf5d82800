"""Reading a file in a fresh interpreter and measuring what the read costs in peak resident memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# MEDSEG_MAX_VOXELS for the hostile reads (the default follows the machine's memory, which differs between
# machines); cases that need Pillow's own limit or the file-length check raise it.
LIMIT = "1e8"

_PROBE = """
import json, resource, sys
import nibabel, numpy, pydicom, SimpleITK, PIL.Image, PIL.PngImagePlugin, tifffile, mrcfile
from medseg.errors import MedsegError
from medseg.io import load
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    image = load(sys.argv[1])
    outcome = "read " + str(image.shape)
except MedsegError as error:
    outcome = "error " + str(error)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"outcome": outcome, "before_mb": before / 1024, "peak_mb": after / 1024}))
"""


def read_in_subprocess(path: Path, limit: str = LIMIT) -> dict[str, object]:
    """``medseg.io.load(path)`` in a fresh interpreter (libraries imported first): its outcome (``read SHAPE`` or
    ``error MESSAGE``) and the process's peak resident memory in MB before the read (``before_mb``) and after
    it (``peak_mb``), from ``getrusage``."""
    import medseg

    env = {**os.environ, "MEDSEG_MAX_VOXELS": limit, "PYTHONPATH": str(Path(medseg.__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(path)], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"the probe failed: {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))
