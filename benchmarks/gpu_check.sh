#!/usr/bin/env bash
# `make gpu-check`: on a machine with one NVIDIA GPU (nothing downloaded; torch, triton, nvcc, pybind11
# and ninja already installed for `python3`), build fastcore_ai with its CUDA kernels in place, run every
# CUDA and Triton test natively, run the CUDA build checks, benchmark the moe family on the GPU, and
# write ${OUT:-./gpu-check-out}/summary.md (GPU name, pytest summary lines, the benchmark table).
#
# Finishes in under 8 minutes: each step runs under `timeout`, within one overall budget
# (GPU_CHECK_BUDGET_S, default 450 s). A failing step is recorded and the later steps still run.
# Exit status: 0 when everything passed; 1 when the build, the extension check or a test failed;
# 2 when only the benchmark failed. PYTHON overrides the interpreter (default python3).
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

export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export FASTCORE_AI_CUDA=1   # fail the build loudly rather than silently build CPU-only
export TRITON_INTERPRET=0   # native Triton on the GPU (tests/conftest.py defaults it to 1)

# ---- 1. build in place
BUILD_LOG="$OUT_DIR/build.log"
: >"$BUILD_LOG"
build_ok=0
build_how="none"
pip_build() {
  timeout "$(step_timeout 300 200)" "$PY" -m pip install --no-deps --no-build-isolation -e . >>"$BUILD_LOG" 2>&1
}
log "building (MAX_JOBS=$MAX_JOBS)"
if pip_build; then
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
if timeout 120 "$PY" - "$INFO_JSON" >"$OUT_DIR/build_info.log" 2>&1 <<'EOF'; then extension_ok=1; fi
import json, sys
import fastcore_ai
info = fastcore_ai.build_info()
open(sys.argv[1], "w").write(json.dumps(info, indent=2))
print(json.dumps(info, indent=2))
problems = [what for what, bad in (("native extension not loaded", info["native_extension"] != "loaded"),
                                   ("CUDA kernels not compiled", not info["cuda_kernels_compiled"]),
                                   ("no GPU visible", not info["gpu_visible"])) if bad]
if problems:
    sys.exit("; ".join(problems))
EOF
log "extension check: $([ $extension_ok = 1 ] && echo ok || echo FAILED)"

# Last line of a pytest log that looks like its summary ("3 passed, 1 skipped in 2.1s").
pytest_summary() {
  local line
  line=$(grep -E "(passed|failed|error|skipped|deselected|no tests ran).* in [0-9.]+s" "$1" | tail -n 1)
  echo "${line:-no pytest summary line (see $(basename "$1"))}"
}

# ---- 3. every CUDA and Triton test, natively
TEST_LOG="$OUT_DIR/pytest_cuda_triton.log"
log "pytest tests -m 'cuda or triton'"
timeout "$(step_timeout 270 110)" "$PY" -m pytest tests -m "cuda or triton" -q >"$TEST_LOG" 2>&1
test_rc=$?
log "tests: exit $test_rc, $(pytest_summary "$TEST_LOG")"

# ---- 4. the CUDA build checks with this machine's nvcc (ptxas spills, cubins, emulated kernels)
BUILD_TEST_LOG="$OUT_DIR/pytest_cuda_build.log"
timeout "$(step_timeout 60 90)" "$PY" -m pytest tests/test_cuda_build.py -q >"$BUILD_TEST_LOG" 2>&1
build_test_rc=$?
log "build checks: exit $build_test_rc, $(pytest_summary "$BUILD_TEST_LOG")"

# ---- 5. the moe benchmarks on the GPU
BENCH_TXT="$OUT_DIR/bench_moe_cuda.txt"
log "bench --family moe --device cuda"
timeout "$(step_timeout 150 10)" "$PY" -m fastcore_ai bench --family moe --device cuda \
  --json "$OUT_DIR/bench_moe_cuda.json" >"$BENCH_TXT" 2>&1
bench_rc=$?
log "bench: exit $bench_rc"

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
  echo "- pytest tests -m \"cuda or triton\": $(status_word $test_rc): $(pytest_summary "$TEST_LOG")"
  echo "- pytest tests/test_cuda_build.py: $(status_word $build_test_rc): $(pytest_summary "$BUILD_TEST_LOG")"
  echo "- bench --family moe --device cuda: $(status_word $bench_rc) (bench_moe_cuda.json)"
  if [ "$test_rc" != 0 ]; then
    echo
    echo "## failed tests"
    echo
    echo '```'
    grep -E "^(FAILED|ERROR) " "$TEST_LOG" | head -n 40
    echo '```'
  fi
  echo
  echo "## moe benchmark (CUDA)"
  echo
  echo '```'
  tail -n 60 "$BENCH_TXT"
  echo '```'
} >"$OUT_DIR/summary.md"
log "wrote $OUT_DIR/summary.md"
cat "$OUT_DIR/summary.md"

if [ $build_ok != 1 ] || [ $extension_ok != 1 ] || [ $test_rc != 0 ] || [ $build_test_rc != 0 ]; then
  exit 1
fi
[ $bench_rc = 0 ] || exit 2
exit 0
