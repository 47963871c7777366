#!/usr/bin/env bash
# The main job: set everything up, print the environment report, run the layer-norm benchmark on
# whatever device there is (a GPU if present; on a CPU, smoke sizes of what runs there).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. "${TK_VENV:-.venv}/bin/activate"
python -m transformer_kernels info
python benchmarks/bench_layer_norm.py --quick --out "${TK_BENCH_OUT:-build/bench}"
