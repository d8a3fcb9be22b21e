#!/usr/bin/env bash
# `make gpu-check`: on a machine with one NVIDIA GPU (nothing downloaded; torch, triton, nvcc, pybind11
# and ninja already installed for `python3`), build fastcore_ai with its CUDA kernels in place for the
# visible GPU's architecture only (all cores), run every family's CUDA and Triton tests natively, run the
# CUDA build checks, benchmark every family on the GPU against its torch peers (CUDA-event timing, the
# quick shapes), and write ${OUT:-./gpu-check-out}/summary.md (GPU name, pytest summary lines, one table
# per family).
#
# Finishes in under 8 minutes: each step runs under `timeout`, within one overall budget
# (GPU_CHECK_BUDGET_S, default 450 s), and each family's benchmark under its own share, so a hang in one
# step still leaves a summary. A failing step is recorded and the later steps still run.
# Exit status: 0 when everything passed; 1 when the build, the extension check or a test failed;
# 2 when only a benchmark failed. PYTHON overrides the interpreter (default python3);
# GPU_CHECK_FAMILIES the benchmarked families (default: every family's main table).
#
# GPU_CHECK_DRY=1 (`make gpu-check-dry`) runs the same plumbing on a machine without a GPU, each step
# replaced by its CPU equivalent: no build (the installed package), the extension check without the CUDA
# requirements, the CPU-runnable tests of the backend machinery instead of the CUDA ones, the CUDA build
# checks collected only, the benchmarks on the CPU. tests/test_gpu_check_dry.py runs it, so the script
# cannot rot while no GPU is lent.
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT_DIR=${OUT:-./gpu-check-out}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
START=$(date +%s)

# Seconds for the next step: at most $1, keeping $2 seconds for the steps after it (never below 10).
step_timeout() {
  local left=$((BUDGET_S - ($(date +%s) - START) - $2))
  ((left > $1)) && left=$1
  ((left < 10)) && left=10
  echo "$left"
}
log() { echo "[gpu-check $(($(date +%s) - START))s] $*"; }

DRY=${GPU_CHECK_DRY:-0}
FAMILIES=${GPU_CHECK_FAMILIES:-moe moe_experts s4 pq mux_attention mux overhead nerf}
DEVICE=cuda
[ "$DRY" = 1 ] && DEVICE=cpu
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ "$DRY" != 1 ]; then
  export FASTCORE_AI_CUDA=1   # fail the build loudly rather than silently build CPU-only
  export TRITON_INTERPRET=0   # native Triton on the GPU (tests/conftest.py defaults it to 1)
  # Only the visible GPU's architecture (e.g. "9.0"): half the nvcc work of the default "8.0;9.0".
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
    [ -n "$ARCH" ] && export TORCH_CUDA_ARCH_LIST="$ARCH"
  fi
fi

# ---- 1. build in place
BUILD_LOG="$OUT_DIR/build.log"
: >"$BUILD_LOG"
build_ok=0
build_how="none"
pip_build() {
  timeout "$(step_timeout 300 200)" "$PY" -m pip install --no-deps --no-build-isolation -e . >>"$BUILD_LOG" 2>&1
}
log "building (MAX_JOBS=$MAX_JOBS, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default})"
if [ "$DRY" = 1 ]; then
  echo "dry run: no build; the installed fastcore_ai is used" >>"$BUILD_LOG"
  build_ok=1
  build_how="dry run: the installed package"
elif pip_build; then
  build_ok=1
  build_how="pip install --no-build-isolation -e ."
elif grep -q "externally-managed-environment" "$BUILD_LOG" && PIP_BREAK_SYSTEM_PACKAGES=1 pip_build; then
  build_ok=1
  build_how="pip install --no-build-isolation -e . (PIP_BREAK_SYSTEM_PACKAGES=1)"
else
  # Fallback: build the extension next to the sources and import a staged copy of the package in which
  # fastcore_ai.triton_kernels (installed from triton_kernels/ by package_dir) is a symlink.
  log "pip failed; falling back to setup.py build_ext --inplace"
  if timeout "$(step_timeout 300 180)" "$PY" setup.py build_ext --inplace >>"$BUILD_LOG" 2>&1; then
    STAGE=$(mktemp -d)
    cp -r python/fastcore_ai "$STAGE/"
    rm -rf "$STAGE/fastcore_ai/triton_kernels"
    ln -s "$ROOT/triton_kernels" "$STAGE/fastcore_ai/triton_kernels"
    export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"
    build_ok=1
    build_how="setup.py build_ext --inplace, package staged at $STAGE"
  fi
fi
log "build: $([ $build_ok = 1 ] && echo ok || echo FAILED) ($build_how)"

# ---- 2. the extension has CUDA kernels and sees the GPU (otherwise the CUDA tests would only skip)
INFO_JSON="$OUT_DIR/build_info.json"
extension_ok=0
if timeout 120 "$PY" - "$INFO_JSON" "$DRY" >"$OUT_DIR/build_info.log" 2>&1 <<'EOF'; then extension_ok=1; fi
import json, sys
import fastcore_ai
info = fastcore_ai.build_info()
open(sys.argv[1], "w").write(json.dumps(info, indent=2))
print(json.dumps(info, indent=2))
needs_gpu = sys.argv[2] != "1"
problems = [what for what, bad in (("native extension not loaded", info["native_extension"] != "loaded"),
                                   ("CUDA kernels not compiled", needs_gpu and not info["cuda_kernels_compiled"]),
                                   ("no GPU visible", needs_gpu and not info["gpu_visible"])) if bad]
if problems:
    sys.exit("; ".join(problems))
EOF
log "extension check: $([ $extension_ok = 1 ] && echo ok || echo FAILED)"

# Last line of a pytest log that looks like its summary ("3 passed, 1 skipped in 2.1s").
pytest_summary() {
  local line
  line=$(grep -E "(passed|failed|error|skipped|deselected|no tests ran|collected).* in [0-9.]+s" "$1" | tail -n 1)
  echo "${line:-no pytest summary line (see $(basename "$1"))}"
}

# ---- 3. every CUDA and Triton test, natively
TEST_LOG="$OUT_DIR/pytest_cuda_triton.log"
if [ "$DRY" = 1 ]; then
  TEST_WHAT="pytest tests/test_backends.py (dry run)"
  timeout "$(step_timeout 270 110)" "$PY" -m pytest tests/test_backends.py -q >"$TEST_LOG" 2>&1
else
  TEST_WHAT="pytest tests -m \"cuda or triton\""
  log "pytest tests -m 'cuda or triton'"
  timeout "$(step_timeout 270 110)" "$PY" -m pytest tests -m "cuda or triton" -q >"$TEST_LOG" 2>&1
fi
test_rc=$?
log "tests: exit $test_rc, $(pytest_summary "$TEST_LOG")"

# ---- 4. the CUDA build checks with this machine's nvcc (ptxas spills, cubins, emulated kernels)
BUILD_TEST_LOG="$OUT_DIR/pytest_cuda_build.log"
BUILD_TEST_ARGS=(-q)
[ "$DRY" = 1 ] && BUILD_TEST_ARGS=(-q --collect-only)
timeout "$(step_timeout 60 90)" "$PY" -m pytest tests/test_cuda_build.py "${BUILD_TEST_ARGS[@]}" >"$BUILD_TEST_LOG" 2>&1
build_test_rc=$?
log "build checks: exit $build_test_rc, $(pytest_summary "$BUILD_TEST_LOG")"

# ---- 5. every family's benchmark on the GPU, each under an equal share of the time left
bench_rc=0
declare -A BENCH_RC
set -- $FAMILIES
remaining=$#
for family in $FAMILIES; do
  left=$((BUDGET_S - ($(date +%s) - START) - 5))
  share=$((left / remaining))
  ((share < 10)) && share=10
  log "bench --family $family --device $DEVICE --quick (${share}s)"
  timeout "$share" "$PY" -m fastcore_ai bench --family "$family" --device "$DEVICE" --quick \
    --json "$OUT_DIR/bench_${family}_${DEVICE}.json" >"$OUT_DIR/bench_${family}_${DEVICE}.txt" 2>&1
  BENCH_RC[$family]=$?
  [ "${BENCH_RC[$family]}" = 0 ] || bench_rc=1
  remaining=$((remaining - 1))
done
log "bench: $([ $bench_rc = 0 ] && echo ok || echo 'some FAILED')"

# ---- summary
status_word() { if [ "$1" = 0 ]; then echo ok; elif [ "$1" = 124 ]; then echo "TIMED OUT"; else echo "FAILED (exit $1)"; fi; }
GPU_NAME=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)
{
  echo "# gpu-check summary"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), total $(($(date +%s) - START)) s"
  echo "- GPU: ${GPU_NAME:-nvidia-smi unavailable}"
  echo "- commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"
  echo "- build: $([ $build_ok = 1 ] && echo ok || echo FAILED) via $build_how (build.log)"
  echo "- extension: $([ $extension_ok = 1 ] && echo ok || echo "FAILED: $(tail -n 1 "$OUT_DIR/build_info.log")") (build_info.json)"
  echo "- mode: $([ "$DRY" = 1 ] && echo 'DRY RUN on the CPU (no GPU, plumbing only)' || echo GPU)"
  echo "- $TEST_WHAT: $(status_word $test_rc): $(pytest_summary "$TEST_LOG")"
  echo "- pytest tests/test_cuda_build.py ${BUILD_TEST_ARGS[*]}: $(status_word $build_test_rc): $(pytest_summary "$BUILD_TEST_LOG")"
  for family in $FAMILIES; do
    echo "- bench --family $family --device $DEVICE --quick: $(status_word "${BENCH_RC[$family]}") (bench_${family}_${DEVICE}.json)"
  done
  if [ "$test_rc" != 0 ]; then
    echo
    echo "## failed tests"
    echo
    echo '```'
    grep -E "^(FAILED|ERROR) " "$TEST_LOG" | head -n 40
    echo '```'
  fi
  for family in $FAMILIES; do
    echo
    echo "## $family benchmark ($DEVICE)"
    echo
    grep -E "^\|" "$OUT_DIR/bench_${family}_${DEVICE}.txt" | head -n 60
    [ "${BENCH_RC[$family]}" = 0 ] || { echo; echo '```'; tail -n 15 "$OUT_DIR/bench_${family}_${DEVICE}.txt"; echo '```'; }
  done
} >"$OUT_DIR/summary.md"
log "wrote $OUT_DIR/summary.md"
cat "$OUT_DIR/summary.md"

if [ $build_ok != 1 ] || [ $extension_ok != 1 ] || [ $test_rc != 0 ] || [ $build_test_rc != 0 ]; then
  exit 1
fi
[ $bench_rc = 0 ] || exit 2
exit 0
