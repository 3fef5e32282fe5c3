#!/usr/bin/env bash
# Create (or reuse) .venv with the pinned CPU torch, the dev tools, and antibody_fast installed
# editable with its compiled C++ extension. Safe to run repeatedly: a second run reinstalls only
# when pyproject.toml, setup.py, constraints.txt or csrc/ changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.antibody_fast_stamp
want=$(cat pyproject.toml setup.py constraints.txt csrc/* | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! python -c "import antibody_fast._C" 2>/dev/null; then
  echo "[setup] installing (torch first, pinned to the CPU build: DESIGN.md §6)"
  python -m pip install -q --disable-pip-version-check --upgrade pip "setuptools>=70" wheel
  python -m pip install -q --disable-pip-version-check torch==2.13.0
  python -m pip install -q --disable-pip-version-check -c constraints.txt ninja
  # --no-build-isolation: build the C++ extension against the torch installed above.
  MAX_JOBS=${MAX_JOBS:-2} python -m pip install -q --disable-pip-version-check -c constraints.txt \
    --no-build-isolation -e ".[dev]"
  echo "$want" > "$stamp"
else
  echo "[setup] .venv is up to date"
fi
