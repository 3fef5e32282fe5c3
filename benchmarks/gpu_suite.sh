#!/usr/bin/env bash
# Every GPU figure of antibody_fast in one short run (target: < 9 minutes on one H100/H200).
#
# For a GPU machine without network where torch, triton, transformers, peft, pytest-benchmark and ninja are
# preinstalled (no `datasets`). Steps, each under its own `timeout` so that a hang cannot eat the run:
#   1. install the project: pip install --no-deps --no-build-isolation -e .
#      (fallback: build the C++ extension in place and use the source tree through PYTHONPATH)
#   2. python -m antibody_fast.info  (+ nvidia-smi)
#   3. the `gpu`-marked tests, then the Triton tests natively (TRITON_INTERPRET unset; bf16 cases included)
#   4. the GPU benchmarks with `antibody-fast bench --device cuda`: the ops (sequence log-prob at
#      V=32000 and V=128256, flat-parameter ops) and the training steps (~1B Llama, bf16, seq 512, batch 8),
#      each suite with its own time limit, then one merged report <device-slug>-<date>.{json,md,png};
#      then FSDP2 against replicated data parallelism (benchmarks/bench_fsdp.py under torchrun, 1 or 2 GPUs):
#      fsdp-<device-slug>-<date>.{json,md}
#   5. everything (logs, JSON, Markdown, PNG, SUMMARY.md) stays in one folder: --out DIR, else $OUT when
#      set, else benchmarks/results/gpu-<date>.
#
# Usage: bash benchmarks/gpu_suite.sh [--out DIR] [--quick] [--skip-install] [--skip-tests] [--dry-run]
#                                     [--device cuda|cpu]
#   --dry-run prints the commands without running anything; --device cpu (with --quick) smoke-tests the
#   script itself on a machine without a GPU.
#   PYTHON=... selects the interpreter (default: python); BUDGET_S=... the total budget (default 530 s);
#   BENCH_DIR=... the folder of bench_*.py files (default: benchmarks); OPS_LIMIT_S / STEPS_LIMIT_S=... the
#   time limits of the two benchmark runs (default 190 / 150 s; each also shrinks to the budget left);
#   FSDP_LIMIT_S=... the FSDP2 benchmark's (default 100 s).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
QUICK=""
SKIP_INSTALL=0
SKIP_TESTS=0
OUTDIR="${OUT:-}"
PY="${PYTHON:-python}"
BUDGET_S="${BUDGET_S:-530}"
BENCH_DIR="${BENCH_DIR:-benchmarks}"
DEVICE=cuda

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --quick) QUICK="--quick" ;;
    --skip-install) SKIP_INSTALL=1 ;;
    --skip-tests) SKIP_TESTS=1 ;;
    --out)
      [ $# -ge 2 ] || { echo "gpu_suite: --out needs a folder" >&2; exit 2; }
      OUTDIR="$2"; shift ;;
    --out=*) OUTDIR="${1#--out=}" ;;
    --device)
      [ $# -ge 2 ] || { echo "gpu_suite: --device needs cuda or cpu" >&2; exit 2; }
      DEVICE="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_suite: unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_suite: --device must be cuda or cpu" >&2; exit 2 ;; esac
DATE="$(date -u +%Y-%m-%d)"
[ -n "$OUTDIR" ] || OUTDIR="benchmarks/results/gpu-$DATE"
SUMMARY="$OUTDIR/SUMMARY.md"
FAILED=0

if [ "$DRY" = 0 ]; then
  mkdir -p "$OUTDIR"
  OUTDIR="$(cd "$OUTDIR" && pwd)"
  SUMMARY="$OUTDIR/SUMMARY.md"
  {
    echo "# antibody_fast GPU suite, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "| step | status | seconds | log |"
    echo "|---|---|---|---|"
  } > "$SUMMARY"
fi

# Seconds left of the total budget (never below 10).
left() { local l=$((BUDGET_S - SECONDS)); [ "$l" -lt 10 ] && l=10; echo "$l"; }

# step NAME LIMIT_S COMMAND...: run COMMAND under `timeout` (SIGINT first, so that pytest still writes its
# reports; SIGKILL 20 s later), log to $OUTDIR/NAME.log and the console, record the outcome in SUMMARY.md.
step() {
  local name="$1" limit="$2"; shift 2
  local l; l="$(left)"
  [ "$limit" -gt "$l" ] && limit="$l"
  echo "[gpu_suite] === $name (limit ${limit}s) ==="
  echo "+ $(printf "%q " "$@")"
  [ "$DRY" = 1 ] && return 0
  local t0=$SECONDS
  timeout -s INT -k 20 "$limit" "$@" 2>&1 | tee "$OUTDIR/$name.log"
  local rc=${PIPESTATUS[0]}
  local dt=$((SECONDS - t0)) status="ok"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="TIMEOUT after ${limit}s"; FAILED=1
  elif [ "$rc" != 0 ]; then status="failed (exit $rc)"; FAILED=1; fi
  echo "| $name | $status | $dt | $name.log |" >> "$SUMMARY"
  echo "[gpu_suite] $name: $status in ${dt}s"
  return 0
}

unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1

# 1. install
if [ "$SKIP_INSTALL" = 0 ]; then
  step 01-install 200 "$PY" -m pip install --no-deps --no-build-isolation -e .
  if [ "$DRY" = 0 ] && ! "$PY" -c "import antibody_fast" 2>/dev/null; then
    echo "[gpu_suite] install failed: building the extension in place and using the source tree"
    step 01b-build-inplace 200 "$PY" setup.py build_ext --inplace
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi

# 2. environment
step 02-info 60 "$PY" -m antibody_fast.info
if command -v nvidia-smi >/dev/null 2>&1; then
  step 02b-nvidia-smi 20 nvidia-smi
fi

# 3. tests on the GPU: gpu-marked tests (bf16 cases), then every Triton test natively
if [ "$SKIP_TESTS" = 0 ] && [ "$DEVICE" = cpu ]; then
  echo "[gpu_suite] --device cpu: skipping the GPU tests"
elif [ "$SKIP_TESTS" = 0 ]; then
  step 03-tests-gpu 120 "$PY" -m pytest tests -q -m gpu -p no:cacheprovider \
    --junitxml="$OUTDIR/03-tests-gpu.xml"
  step 04-tests-triton 90 "$PY" -m pytest tests -q -m "not gpu and not slow" -k triton -p no:cacheprovider \
    --junitxml="$OUTDIR/04-tests-triton.xml"
fi

# 4. benchmarks: ops and steps as separate runs (a hang in one cannot take the other's time); each runner
#    interrupts its suite at --time-limit and still reports the cases that finished.
# The runner's own --time-limit ends each suite 40 s before the outer `timeout`, within the budget left
# (30 s of it kept for the final report).
bench_limit() {
  local l=$(( $(left) - 70 ))  # 40 s of grace before the outer timeout + 30 s kept for the report
  [ "$1" -lt "$l" ] && l="$1"
  [ "$l" -lt 10 ] && l=10
  echo "$l"
}
OPS_LIMIT="$(bench_limit "${OPS_LIMIT_S:-190}")"
step 05-bench-ops $((OPS_LIMIT + 40)) "$PY" -m antibody_fast bench --device "$DEVICE" $QUICK --out "$OUTDIR" \
  --bench-dir "$BENCH_DIR" --name gpu-ops --only "bench_sequence_logprob or bench_flat" --time-limit "$OPS_LIMIT"
STEPS_LIMIT="$(bench_limit "${STEPS_LIMIT_S:-150}")"
step 06-bench-steps $((STEPS_LIMIT + 40)) "$PY" -m antibody_fast bench --device "$DEVICE" $QUICK --out "$OUTDIR" \
  --bench-dir "$BENCH_DIR" --name gpu-steps --only "bench_steps" --time-limit "$STEPS_LIMIT"

# 4b. FSDP2 against replicated data parallelism (bench_fsdp.py): two ranks where the machine has two GPUs, else
#     one rank with FSDP2 wrapping (--device cpu: two gloo ranks); time per step and memory per rank.
if [ "$DEVICE" = cuda ] && [ "$DRY" = 0 ]; then
  NRANKS="$("$PY" -c 'import torch; print(max(1, min(2, torch.cuda.device_count())))' 2>/dev/null || echo 1)"
elif [ "$DEVICE" = cuda ]; then
  NRANKS="<1 or 2 GPUs>"
else
  NRANKS=2
fi
FSDP_LIMIT="$(bench_limit "${FSDP_LIMIT_S:-100}")"
step 06b-bench-fsdp $((FSDP_LIMIT + 40)) "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NRANKS" \
  "$BENCH_DIR/bench_fsdp.py" --device "$DEVICE" $QUICK --out "$OUTDIR"

# 5. one report named after the device and the date
if [ "$DRY" = 1 ]; then
  STEM="$DEVICE-<device-name>-$DATE"
else
  STEM="$("$PY" -c "from antibody_fast.bench import device_info; print(device_info('$DEVICE')['slug'])" 2>/dev/null \
    || echo "$DEVICE-unknown")-$DATE${QUICK:+-quick}"
fi
PARTS=()
for part in gpu-ops gpu-steps; do
  if [ "$DRY" = 1 ] || [ -f "$OUTDIR/$part.json" ]; then PARTS+=("$OUTDIR/$part.json"); fi
done
if [ "${#PARTS[@]}" -gt 0 ]; then
  step 07-report 60 "$PY" -m antibody_fast bench --from-json "${PARTS[@]}" --out "$OUTDIR" --name "$STEM"
else
  echo "[gpu_suite] no benchmark results to merge"
  [ "$DRY" = 0 ] && echo "| 07-report | no benchmark results | 0 | - |" >> "$SUMMARY"
  FAILED=1
fi

if [ "$DRY" = 0 ]; then
  { echo; echo "total: ${SECONDS}s; results: $STEM.{json,md,png}"; } >> "$SUMMARY"
  echo "[gpu_suite] done in ${SECONDS}s; everything is in $OUTDIR"
  cat "$SUMMARY"
fi
exit "$FAILED"
