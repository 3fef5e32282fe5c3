#!/usr/bin/env bash
# README test command: set up the environment, lint, and run the test-suite (CPU; Triton under the
# interpreter). Extra arguments go to pytest. pytest's exit code 5 (no tests ran) fails like any other.
set -euo pipefail
cd "$(dirname "$0")/.."
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
