#!/usr/bin/env bash
# README main job: set up the environment and run the embedded CPU demo (extra arguments go to it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
python -m antibody_fast.info
antibody-fast demo "$@"
