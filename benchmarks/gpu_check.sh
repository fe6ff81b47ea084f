#!/usr/bin/env bash
# One prepared GPU session: build the package offline, report which kernels are live, run the CUDA
# tests, then the benchmarks, writing everything under OUT (default: $OUT or ./gpu_out).
# Budget: <= 6 minutes on an H100. Usage: bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
# python -P everywhere: never import the source tree (it has no compiled extension) instead of the
# installed package.
OUT_DIR=${1:-${OUT:-gpu_out}}
mkdir -p "$OUT_DIR"
start=$(date +%s)
step() { echo "== [$(( $(date +%s) - start ))s] $*" | tee -a "$OUT_DIR/summary.txt"; }

step "build (offline, no deps)"
if ! pip install --no-build-isolation --no-deps --no-index -v . >"$OUT_DIR/build.log" 2>&1; then
  tail -40 "$OUT_DIR/build.log" | tee -a "$OUT_DIR/summary.txt"
  step "build FAILED"; exit 1
fi
grep -E "CUDA|Built target|-- rethinkcam" "$OUT_DIR/build.log" | tail -8 | tee -a "$OUT_DIR/summary.txt"
python -P -m rethinkcam_fast info 2>&1 | tee -a "$OUT_DIR/summary.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$OUT_DIR/summary.txt"

step "CUDA tests"
timeout 200 python -P -m pytest tests -q -m cuda -p no:cacheprovider -x >"$OUT_DIR/tests_cuda.txt" 2>&1
echo "exit code $?" >>"$OUT_DIR/tests_cuda.txt"
tail -15 "$OUT_DIR/tests_cuda.txt" | tee -a "$OUT_DIR/summary.txt"

step "benchmarks"
timeout 200 python benchmarks/report.py --out "$OUT_DIR/bench.md" --save-json "$OUT_DIR/bench.json" \
  >"$OUT_DIR/bench.log" 2>&1
echo "exit code $?" >>"$OUT_DIR/bench.log"
cat "$OUT_DIR/bench.md" 2>/dev/null | tee -a "$OUT_DIR/summary.txt" || tail -30 "$OUT_DIR/bench.log"

step "rest of the test suite (CPU paths on this machine)"
timeout 120 python -P -m pytest tests -q -m "not cuda" -p no:cacheprovider >"$OUT_DIR/tests_rest.txt" 2>&1
echo "exit code $?" >>"$OUT_DIR/tests_rest.txt"
tail -5 "$OUT_DIR/tests_rest.txt" | tee -a "$OUT_DIR/summary.txt"
step "done"
