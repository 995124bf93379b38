#!/usr/bin/env bash
# On the device machine: transformers peers on Qwen3-30B-A3B (batch 1) and OLMoE (batch 8),
# the serving sweep on OLMoE (resident), the GPU tests again, and a prefill diagnostic without fusion.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=$PWD:/tmp/site
peer() {  # shape mode batch
  timeout 170 python3 benchmarks/hf_peer.py --config benchmarks/configs/$1 --mode $2 --batch $3 --prefill-lens 512,2048 \
    >> "$OUT/peers.jsonl" 2>> "$OUT/peers.err" || echo "{\"config\": \"$1\", \"mode\": \"$2\", \"batch\": $3, \"error\": \"timeout or failure\"}" >> "$OUT/peers.jsonl"
}
peer qwen3-30b-a3b plain 1
peer qwen3-30b-a3b best 1
cat "$OUT/peers.jsonl"
RATES=2,8,32,inf NUM_REQUESTS=96 DURATION=12 OUT="$OUT/serve_olmoe_resident.json" PYTHON=python3 LOG="$OUT/serve.log" \
  timeout 200 bash benchmarks/serve_sweep.sh --max-num-seqs 64 --dtype bfloat16 > "$OUT/serve_sweep.txt" 2>&1
tail -c 1500 "$OUT/serve_sweep.txt"
timeout 120 python3 -m pytest -q -p no:logging tests/test_gpu.py > "$OUT/gpu_tests.log" 2>&1
grep -E "passed|failed|^FAILED" "$OUT/gpu_tests.log" | head
if [ "$SECONDS" -lt 420 ]; then peer olmoe-1b-7b plain 8; fi
if [ "$SECONDS" -lt 450 ]; then peer olmoe-1b-7b best 8; fi
tail -2 "$OUT/peers.jsonl"
