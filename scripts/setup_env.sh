#!/usr/bin/env bash
# Create or update the project's virtual environment (.venv) with the package and its test
# dependencies. Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.elrea-setup-stamp
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev,quantization,plots]"
  echo "$want" > "$stamp"
else
  # Cheap re-install of the editable package only (picks up source moves).
  .venv/bin/python -m pip install -q --no-deps -e . >/dev/null
fi
