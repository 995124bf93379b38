#!/usr/bin/env bash
# On the device machine: decode profile (OLMoE), moetier bench of Qwen3-30B-A3B, transformers peers on OLMoE.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m moetier.cli calibrate > "$OUT/calibration.json" 2>/dev/null
timeout 120 python3 benchmarks/profile_decode.py benchmarks/configs/olmoe-1b-7b --batch 1 > "$OUT/profile_olmoe_b1.txt" 2>&1
head -45 "$OUT/profile_olmoe_b1.txt"
timeout 240 python3 -m moetier.cli bench --model benchmarks/configs/qwen3-30b-a3b --load-format dummy --dtype bfloat16 \
  --batch-sizes 1,8,64 --prefill-lens 512,2048 > "$OUT/qwen3_moetier.json" 2> "$OUT/qwen3_moetier.err"
tail -3 "$OUT/qwen3_moetier.err"; cat "$OUT/qwen3_moetier.json"
for mode in plain best; do
  timeout 150 python3 benchmarks/hf_peer.py --config benchmarks/configs/olmoe-1b-7b --mode $mode --batch 1 --prefill-lens 512,2048 \
    >> "$OUT/olmoe_hf.jsonl" 2>> "$OUT/olmoe_hf.err"
done
cat "$OUT/olmoe_hf.jsonl"; grep -v DEBUG "$OUT/olmoe_hf.err" | tail -5
