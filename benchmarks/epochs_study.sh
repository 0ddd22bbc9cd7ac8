#!/usr/bin/env bash
# How does training length move a model's MNIST ROCO AUROC? Asked first of the AE, which beats the paper's
# (paper 000 table 1: AE 63.2 average AUROC) when capped at 5 epochs. The papers stop early with patience 10
# and state no epoch cap; our AE's validation loss still falls at epoch 100, and each longer run
# generalises better to the held-out digit (the papers' over-generalisation), lowering AUROC. This trains
# one cell (class 3, seed 2022) in stages, resuming each time, and prints the test AUROC of the
# best-validation weights after each stage. PROTOCOL=one_class asks the same of a one-class cell (CLASS is
# then the normal digit): one-class DAAD's AUROC peaks within a few epochs (results/one-class-scores.md).
# Usage: [MODEL=ae] [PROTOCOL=roco] [SET="key=value ..."] benchmarks/epochs_study.sh [DATA_DIR] [CLASS] [STAGES...]
#   e.g. MODEL=memorizer SET=model_config.memory_size=8 benchmarks/epochs_study.sh ../shared/data 3 5 10 25
#   (one torch thread; about 10 s per epoch)
#   One-class DAAD as `mnemo bench accuracy` trains it (about 1 minute per epoch):
#   PROTOCOL=one_class MODEL=daad SET="model_config.in_channels=1 model_config.image_size=32
#   model_config.mean=[0.5] model_config.std=[0.5] model_config.widths=[32,64,128]
#   model_config.division_rates=[1,1,1]" benchmarks/epochs_study.sh ../shared/data 6 3 10 25
set -euo pipefail
data=${1:-../shared/data}/mnist
class=${2:-3}
shift $(( $# < 2 ? $# : 2 ))
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(5 10 25 50 100 150 200)
model=${MODEL:-ae}
protocol=${PROTOCOL:-roco}
out=runs/epochs-$protocol-$model-$class
read -ra kvs <<< "${SET:-}"  # split on spaces, no globbing
sets=()
for kv in ${kvs[@]+"${kvs[@]}"}; do sets+=(--set "$kv"); done
mkdir -p runs && rm -rf "$out"  # each study starts from scratch; its stages then resume one another
export OMP_NUM_THREADS=1
mnemo=${MNEMO:-mnemo}
printf '| epochs trained | best epoch | best val loss | test AUROC | AUPRC | F1 |\n| --- | --- | --- | --- | --- | --- |\n'
for e in "${stages[@]}"; do
  "$mnemo" train --model "$model" ${sets[@]+"${sets[@]}"} --data "$data" --set data.kind=idx --set "data.protocol=$protocol" \
    --set "data.target_class=$class" --set optim.patience=100000 --epochs "$e" --seed 2022 \
    --out "$out" --resume --no-progress > "$out.log" 2>&1 || { cat "$out.log"; exit 1; }
  python3 - "$out/report.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
i = r["test"]["image"]
print(f"| {r['epochs']} | {r['best_epoch']} | {r['best_val_loss']:.5f} | {100 * i['auroc']:.2f} | "
      f"{100 * i['auprc']:.2f} | {100 * i['f1']:.2f} |", flush=True)
PY
done
