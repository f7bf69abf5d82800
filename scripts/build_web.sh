#!/usr/bin/env bash
# Rebuild the workbench page's JavaScript (web/ -> src/medseg/server/static/workbench.js) from web/package.json and
# its lockfile, with the notices of the bundled packages. `--check` builds into a temporary folder and fails when
# the shipped files differ from what the sources give (CI runs it). Needs Node.js and npm (nothing at run time does).
set -euo pipefail
cd "$(dirname "$0")/../web"
static=../src/medseg/server/static
out=$static
if [[ "${1:-}" == "--check" ]]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
npm ci --no-audit --no-fund --loglevel=error >/dev/null
npx --no-install esbuild src/main.js --bundle --format=esm --target=es2020 --minify --legal-comments=none \
  --log-level=warning --metafile="$out/meta.json" --outfile="$out/workbench.js"
node licenses.mjs "$out/meta.json" "$out/THIRD_PARTY_LICENSES.txt"
rm "$out/meta.json"
if [[ "${1:-}" == "--check" ]]; then
  for file in workbench.js THIRD_PARTY_LICENSES.txt; do
    if ! cmp -s "$out/$file" "$static/$file"; then
      echo "src/medseg/server/static/$file does not match web/ (run scripts/build_web.sh and commit)" >&2
      exit 1
    fi
  done
  echo "the shipped workbench bundle matches web/"
fi
