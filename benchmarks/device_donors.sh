#!/usr/bin/env bash
# On the device machine: train the three routing donors (scripts/train_tiny_moe.py --preset
# donor-SHAPE: the routing shape of each benchmark model on a small hidden size), trace each on the
# held-out split, and bring back only the traces (donors are not shipped). Analysis and simulation
# of the traces run anywhere afterwards (`moetier trace analyze|simulate`).
#   carry: .corpus (scripts/build_corpus.py's output: the same held-out text as the tiny model's)
#   BUDGET: training seconds per donor (default 120)
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
BUDGET=${BUDGET:-120}
xz -dc .corpus/heldout.txt.xz > /tmp/heldout.txt
for shape in mixtral-8x7b qwen3-30b-a3b olmoe-1b-7b; do
  timeout $((BUDGET + 120)) python3 scripts/train_tiny_moe.py --preset donor-$shape --out /tmp/donor-$shape \
    --time-budget "$BUDGET" --heldout-tokens 65536 >> "$OUT/train_donors.log" 2>&1
  grep -E "held-out|ppl" "$OUT/train_donors.log" | tail -2
  cp moetier/assets/tiny-moe/tokenizer.json moetier/assets/tiny-moe/tokenizer_config.json /tmp/donor-$shape/
  timeout 120 python3 -m moetier.cli trace record --model /tmp/donor-$shape --dtype bfloat16 --text /tmp/heldout.txt \
    --max-tokens 16384 --generate 16 --out "$OUT/donor-$shape-heldout.npz" 2>> "$OUT/train_donors.log"
  ls -la "$OUT/donor-$shape-heldout.npz"
done
