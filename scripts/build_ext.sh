#!/usr/bin/env bash
# Rebuild the C++ extension in place after editing csrc/ (serialised with a lock: safe to call concurrently).
set -euo pipefail
cd "$(dirname "$0")/.."
exec flock /tmp/antibody_fast_build.lock env MAX_JOBS=${MAX_JOBS:-2} .venv/bin/python setup.py -q build_ext --inplace
