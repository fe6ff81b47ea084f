#!/usr/bin/env bash
# One prepared GPU session: build the package offline, report which kernels are live, run the CUDA
# tests, then the benchmarks, writing everything under OUT (default: $OUT or ./gpu_out).
# Budget: the default suites (tap cam pas boxes video) fit one 10-minute device call (~9 min on an
# H100); run SUITES="diffcam evaluate" as a second call or in a later session.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR];  SUITES="boxes video" bash benchmarks/gpu_check.sh OUT
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

if [ -d benchmarks/peer_wheels ]; then
  step "peer libraries from benchmarks/peer_wheels (offline)"
  pip install -q --no-index --no-deps --target /tmp/rethinkcam_peers benchmarks/peer_wheels/*.whl \
    2>&1 | tail -3 | tee -a "$OUT_DIR/summary.txt"
  export PYTHONPATH="/tmp/rethinkcam_peers${PYTHONPATH:+:$PYTHONPATH}"
fi

step "CUDA tests"
timeout 150 python -P -m pytest tests -q -m cuda -p no:cacheprovider >"$OUT_DIR/tests_cuda.txt" 2>&1
echo "exit code $?" >>"$OUT_DIR/tests_cuda.txt"
tail -15 "$OUT_DIR/tests_cuda.txt" | tee -a "$OUT_DIR/summary.txt"

# Each suite has its own time box, so one slow suite cannot starve the others.
for suite in ${SUITES:-tap cam pas boxes video}; do
  step "benchmarks: $suite"
  case $suite in tap) box=60 ;; cam) box=150 ;; boxes) box=60 ;; video) box=45 ;; diffcam) box=90 ;; evaluate) box=60 ;; *) box=30 ;; esac
  timeout "$box" python benchmarks/report.py --suite "$suite" \
    --out "$OUT_DIR/bench_$suite.md" --save-json "$OUT_DIR/bench_$suite.json" >"$OUT_DIR/bench_$suite.log" 2>&1
  echo "exit code $?" >>"$OUT_DIR/bench_$suite.log"
  cat "$OUT_DIR/bench_$suite.md" 2>/dev/null | tee -a "$OUT_DIR/summary.txt" || tail -30 "$OUT_DIR/bench_$suite.log"
done

step "done"
