#!/usr/bin/env bash
# The GPU check: on a fresh GPU machine, build the extension, run every test (the GPU ones
# included), run the benchmark suite at quick sizes, and leave everything in OUT_DIR. Target: < 8 min.
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# The whole script keeps to TK_GPU_CHECK_BUDGET seconds (default 540; set it to what your GPU job
# may take): each step's timeout is cut to what is left, and steps that no longer fit are recorded
# as skipped, so the summary always comes back. Steps run in priority order.
# Tests use pytest-xdist (-n 8) when it is installed: most of their time is Triton compiling. The
# kernel tests run before the benchmarks, the other tests after them.
# The suite (python -m transformer_kernels bench) runs one benchmark per process, so that a crash, a poisoned CUDA
# context or a timeout costs that benchmark only; each run adds its tables to OUT_DIR/bench/
# (md, csv, json, summary.md, plots/) as soon as it ends.
#
# Each step is timed and recorded; a failing step does not stop the later ones. The last lines
# printed are the summary (also in OUT_DIR/summary.md: the steps, the targets beside what was
# measured, every table); OUT_DIR/README.md previews benchmarks/results/README.md. To publish, move
# OUT_DIR to benchmarks/results/<card>-<date>/, run `python -m transformer_kernels.bench.results_readme
# benchmarks/results/<card>-<date>` (it rewrites benchmarks/results/README.md), commit both.
# To bring the results back from a remote GPU machine as one file:
#   bash benchmarks/gpu_check.sh /tmp/gc; tar -C /tmp -czf gpu_check.tgz gc
set -u
OUT_DIR=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # also serves an in-place build (below)
PY=${PYTHON:-python3}
SUMMARY="$OUT_DIR/summary.md"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"

BUDGET=${TK_GPU_CHECK_BUDGET:-540}
RESERVE=30  # seconds kept for the summary (two short Python calls, each capped at 12 s)

step() {  # step NAME TIMEOUT_S COMMAND...: run, time, record
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS rc left=$((BUDGET - RESERVE - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "| $name | SKIPPED (budget of ${BUDGET}s spent) | 0 s |" >>"$SUMMARY.steps"
    echo "=== $name: skipped, budget spent" | tee -a "$LOG"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1  # KILL 10 s after TERM: a hung CUDA call cannot stall us
  rc=$?
  local status=ok
  [ $rc -eq 0 ] || status="FAILED (exit $rc)"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="TIMED OUT after ${limit}s"
  echo "| $name | $status | $((SECONDS - t0)) s |" >>"$SUMMARY.steps"
  echo "=== $name: $status in $((SECONDS - t0)) s" | tee -a "$LOG"
  return $rc
}

rm -f "$SUMMARY.steps"
arch=$(timeout -k 5 60 $PY -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}.{p[1]}')" 2>/dev/null || echo 9.0)

build_env=(env MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} TK_BUILD_CUDA=1)
# An older pip/setuptools without editable-wheel support falls back to an in-place build.
step build 240 "${build_env[@]}" $PY -m pip install --no-build-isolation --no-deps --no-index -e . ||
  step build_inplace 240 "${build_env[@]}" $PY setup.py build_ext --inplace
step info 60 $PY -m transformer_kernels info
timeout -k 5 60 $PY -m transformer_kernels info >"$OUT_DIR/info.txt" 2>&1
xdist=()
$PY -c "import xdist" 2>/dev/null && xdist=(-n 8)
# Kernel tests first (what only a GPU can check), then the benchmarks, then the rest of the suite
# (training, CLI, models: on the GPU they take the CUDA/bf16 paths) with whatever time is left.
# -v streams each test's result into the log, so a step cut by its timeout still says what ran.
KERNEL_TESTS=(tests/test_extension.py tests/test_dropout_add_layer_norm.py tests/test_attention.py tests/test_attention_varlen.py
  tests/test_ffn.py tests/test_cross_entropy.py tests/test_autocast.py tests/test_compile.py
  tests/test_nn_layer_norm.py tests/test_nn_transformer.py tests/test_backends.py)
deselect=()
for t in "${KERNEL_TESTS[@]}"; do deselect+=(--ignore="$t"); done
step "tests (kernels)" 240 env TK_REQUIRE_EXTENSION=1 TK_AUTOTUNE=0 $PY -m pytest "${KERNEL_TESTS[@]}" -v -rs \
  "${xdist[@]}" --junitxml="$OUT_DIR/tests_kernels.xml"
BENCH_DIR="$OUT_DIR/bench"
for spec in layer_norm:90 attention:120 training:240 cross_entropy:90 ffn:90 layers:120; do
  step "bench ${spec%%:*}" "${spec##*:}" $PY -m transformer_kernels bench "${spec%%:*}" --quick --out "$BENCH_DIR"
done
# The autotuned kernels' tests again with autotuning on, the path users get by default (each new
# shape is tuned, so they are slower than with TK_AUTOTUNE=0).
step "tests (autotuned kernels)" 180 env TK_REQUIRE_EXTENSION=1 TK_AUTOTUNE=1 $PY -m pytest tests/test_ffn.py \
  tests/test_attention.py -v -rs "${xdist[@]}" --junitxml="$OUT_DIR/tests_kernels_autotuned.xml"
step "tests (the rest)" 300 env TK_REQUIRE_EXTENSION=1 TK_AUTOTUNE=0 $PY -m pytest tests "${deselect[@]}" -v -rs \
  "${xdist[@]}" --junitxml="$OUT_DIR/tests_rest.xml"
if ls "$BENCH_DIR"/*.json >/dev/null 2>&1; then
  timeout -k 2 12 $PY -m transformer_kernels.bench.results_readme "$OUT_DIR" --output "$OUT_DIR/README.md" >>"$LOG" 2>&1 ||
    echo "results_readme.py failed: see gpu_check.log" >"$OUT_DIR/README.md"
fi

{
  echo "# GPU check"
  echo
  timeout -k 2 12 $PY -m transformer_kernels.bench.gpu_summary "$OUT_DIR" || echo "(gpu_summary.py failed)"
  echo
  echo "| step | result | time |"
  echo "|---|---|---|"
  cat "$SUMMARY.steps"
  echo
  [ -f "$OUT_DIR/README.md" ] && sed -n '/^| target/,/^$/p' "$OUT_DIR/README.md"
  echo
  [ -f "$BENCH_DIR/summary.md" ] && sed -e '1s/^# Benchmark suite/## Benchmark suite (bench\/summary.md)/' \
    -e 's#](plots/#](bench/plots/#' "$BENCH_DIR/summary.md"
} >"$SUMMARY"
rm -f "$SUMMARY.steps"
echo
cat "$SUMMARY"
