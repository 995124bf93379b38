#!/usr/bin/env bash
# On the device machine: transformers peers (plain generate, and its best setting: grouped_mm
# experts + static cache + compiled decode), each in its own process, then the serving sweep.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for shape in olmoe-1b-7b qwen3-30b-a3b; do
  for mode in plain best; do
    for batch in ${PEER_BATCHES:-1 8}; do
      timeout ${PEER_TIMEOUT:-150} python3 benchmarks/hf_peer.py --config benchmarks/configs/$shape --mode $mode --batch $batch \
        --prefill-lens 512,2048 >> "$OUT/peers.jsonl" 2>> "$OUT/peers.err" || echo "{\"config\": \"$shape\", \"mode\": \"$mode\", \"batch\": $batch, \"error\": \"timeout or failure\"}" >> "$OUT/peers.jsonl"
    done
  done
done
cat "$OUT/peers.jsonl"
