#!/usr/bin/env bash
# The GPU compile check (tests/test_gpu_compile.py) under another Triton, by default 3.6 (the stack of the GPU
# machines this project can borrow: torch 2.11 + triton 3.6, no network). No GPU needed.
#
# Creates a throw-away venv with triton==$TRITON_SPEC (default "3.6.*") layered over the project's .venv
# (scripts/setup_env.sh; everything else, torch and antibody_fast included, comes from there), prints the
# version, runs the test file there, and deletes the venv. Extra arguments go to pytest.
#   TRITON_SPEC=3.6.* | 3.9.0 | ...   KEEP_VENV=1 keeps the venv (path printed).
# For the full sweep under that Triton: REPORT=1 also runs benchmarks/gpu_compile_report.py with
# --name gpu-compile-<date>-triton<version> (results folder: benchmarks/results).
set -euo pipefail
cd "$(dirname "$0")/.."
TRITON_SPEC="${TRITON_SPEC:-3.6.*}"
[ -x .venv/bin/python ] || bash scripts/setup_env.sh
MAIN_SITE="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
VENV="$(mktemp -d "${TMPDIR:-/tmp}/antibody_fast_triton.XXXXXX")"
cleanup() { if [ "${KEEP_VENV:-0}" = 1 ]; then echo "[gpu_compile_check] kept $VENV"; else rm -rf "$VENV"; fi; }
trap cleanup EXIT
echo "[gpu_compile_check] venv $VENV with triton==$TRITON_SPEC over $MAIN_SITE"
.venv/bin/python -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "triton==$TRITON_SPEC"
# Layer the project's environment behind the venv's own site-packages: this triton wins, the rest (torch,
# pytest, the editable antibody_fast and its .pth hooks) comes from .venv.
VENV_SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "import site; site.addsitedir('$MAIN_SITE')" > "$VENV_SITE/zz_antibody_fast_main_venv.pth"
"$VENV/bin/python" - <<'EOF'
import triton, torch, antibody_fast
print(f"[gpu_compile_check] triton {triton.__version__} ({triton.__file__}), torch {torch.__version__}")
EOF
"$VENV/bin/python" -m pytest tests/test_gpu_compile.py -q -p no:cacheprovider "$@"
if [ "${REPORT:-0}" = 1 ]; then
  ver="$("$VENV/bin/python" -c 'import triton; print(triton.__version__)')"
  "$VENV/bin/python" benchmarks/gpu_compile_report.py --name "gpu-compile-$(date -u +%Y-%m-%d)-triton$ver"
fi
