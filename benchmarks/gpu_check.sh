#!/usr/bin/env bash
# One prepared GPU session: build the package offline, report which kernels are live, run the CUDA
# tests (the never-run paths first), then the benchmark suites, each in its own time box.
#
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]          (default: $OUT, else ./gpu_out)
#   STAGES="build tests bench"  what to run (default: all three)
#   SUITES="tap pas boxes"      benchmark suites (default: tap cam pas boxes video diffcam evaluate)
#   PYTHON=python3              the interpreter that holds the CUDA build of PyTorch
# A 10-minute device call fits "build tests" plus a few suites; plan two calls on one warm machine:
#   STAGES="build tests bench" SUITES="tap pas boxes video" bash benchmarks/gpu_check.sh $OUT
#   STAGES="bench" SUITES="cam diffcam evaluate" bash benchmarks/gpu_check.sh $OUT
#
# The device tool returns at most 8 files from $OUT: everything is written to a work folder, and OUT
# gets summary.txt, tests_cuda.txt and one gpu_check.tgz of the rest (written even when a step fails
# or the call is cut short by its limit — as long as bash gets to run its EXIT trap).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_out}}
PY=${PYTHON:-python3}
STAGES=${STAGES:-build tests bench}
SUITES=${SUITES:-tap cam pas boxes video diffcam evaluate}
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
mkdir -p "$OUT_DIR"
export RETHINKCAM_CUDA=ON  # a build without the CUDA extension is a failure here, not a silent skip
export PYTHONUNBUFFERED=1
start=$(date +%s)
step() { echo "== [$(( $(date +%s) - start ))s] $*" | tee -a "$WORK/summary.txt"; }
finish() {
  cp "$WORK/summary.txt" "$OUT_DIR/" 2>/dev/null
  cp "$WORK/tests_cuda.txt" "$OUT_DIR/" 2>/dev/null
  tar czf "$OUT_DIR/gpu_check.tgz" -C "$WORK" . 2>/dev/null
}
trap finish EXIT
has() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

if has build; then
  step "build (offline, no deps, CUDA required)"
  $PY -c 'import sys, sysconfig, os, torch; print(sys.executable, sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "Python.h:", os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>&1 | tee -a "$WORK/summary.txt"
  if ! $PY -m pip install --no-build-isolation --no-deps --no-index -v . >"$WORK/build.log" 2>&1; then
    step "install into the interpreter failed; trying --target /tmp/rethinkcam_site"
    if ! $PY -m pip install --no-build-isolation --no-deps --no-index -v --target /tmp/rethinkcam_site . >>"$WORK/build.log" 2>&1; then
      tail -40 "$WORK/build.log" | tee -a "$WORK/summary.txt"
      step "build FAILED"; exit 1
    fi
  fi
fi
[ -d /tmp/rethinkcam_site ] && export PYTHONPATH="/tmp/rethinkcam_site${PYTHONPATH:+:$PYTHONPATH}"
grep -E "CUDA|Built target|-- rethinkcam" "$WORK/build.log" 2>/dev/null | tail -8 | tee -a "$WORK/summary.txt"
# python -P everywhere: never import the source tree (it has no compiled extension).
$PY -P -m rethinkcam_fast info 2>&1 | tee -a "$WORK/summary.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$WORK/summary.txt"

if [ -d benchmarks/peer_wheels ]; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/rethinkcam_peers benchmarks/peer_wheels/*.whl \
    2>&1 | tail -3 | tee -a "$WORK/summary.txt"
  export PYTHONPATH="/tmp/rethinkcam_peers${PYTHONPATH:+:$PYTHONPATH}"
fi

if has tests; then
  # First the paths that have never run on a GPU, one by one with a per-test limit (verbose: a cut
  # run still says which passed); then every other CUDA test, spread over 8 processes.
  FIRST="tests/test_tap_cuda.py tests/test_box_ious.py tests/test_boxes.py tests/test_video.py tests/test_cam_cuda.py"
  step "CUDA tests: never-run paths"
  timeout 200 $PY -P -m pytest $FIRST -v -m cuda -p no:cacheprovider --timeout 90 --tb=short \
    >"$WORK/tests_cuda.txt" 2>&1
  echo "exit code $?" >>"$WORK/tests_cuda.txt"
  grep -E "PASSED|FAILED|ERROR|SKIPPED|exit code|passed|failed" "$WORK/tests_cuda.txt" | tail -40 | tee -a "$WORK/summary.txt"
  step "CUDA tests: the rest"
  ignore=""; for f in $FIRST; do ignore="$ignore --ignore=$f"; done
  timeout 200 $PY -P -m pytest tests $ignore -q -m cuda -p no:cacheprovider --timeout 150 -n 8 -rfE --tb=short \
    >>"$WORK/tests_cuda.txt" 2>&1
  echo "exit code $?" >>"$WORK/tests_cuda.txt"
  tail -25 "$WORK/tests_cuda.txt" | tee -a "$WORK/summary.txt"
fi

if has bench; then
  for suite in $SUITES; do
    case $suite in tap) box=60 ;; cam) box=150 ;; pas) box=30 ;; boxes) box=60 ;; video) box=60 ;; diffcam) box=90 ;; evaluate) box=60 ;; *) box=30 ;; esac
    step "benchmarks: $suite (time box ${box}s)"
    $PY benchmarks/report.py --suite "$suite" --time-box "$box" \
      --out "$WORK/bench_$suite.md" --save-json "$WORK/bench_$suite.json" >"$WORK/bench_$suite.log" 2>&1
    echo "exit code $?" >>"$WORK/bench_$suite.log"
    if [ -s "$WORK/bench_$suite.md" ]; then cat "$WORK/bench_$suite.md" | tee -a "$WORK/summary.txt"
    else tail -30 "$WORK/bench_$suite.log" | tee -a "$WORK/summary.txt"; fi
  done
fi

step "done"
