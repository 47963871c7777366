#!/usr/bin/env bash
# The main job: set everything up, print the environment report, train the paper's model on the
# embedded synthetic translation task (about a minute on a 2-core CPU; the fused kernels through
# `auto` on a GPU), then translate a few sentences with beam search and evaluate BLEU on the test set.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. "${TK_VENV:-.venv}/bin/activate"
RUN=${TK_RUN_DIR:-build/runs/synthetic}
rm -rf "$RUN"
python -m transformer_kernels info
python -m transformer_kernels train --out-dir "$RUN" --dropout 0 --batch-tokens 2048 --warmup 400 \
  --max-steps 1200 --eval-interval 400 --log-interval 200
printf 'ninu pene doga kese pira pene nede\nteli ninu leti maki\nnoro temu kese roso gapi\n' |
  python -m transformer_kernels translate --model "$RUN"
python -m transformer_kernels evaluate --model "$RUN"
