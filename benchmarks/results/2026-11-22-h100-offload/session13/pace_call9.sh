#!/usr/bin/env bash
# step_times (unpinned) with the CPU pace probe on core 8, twice; plus per-thread CPU of the engine.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/benchmarks
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for i in 1 2; do
  taskset -c 8 python3 benchmarks/cpu_pace.py --seconds 100 > "$OUT/pace$i.json" &
  PACE=$!
  timeout 130 python3 benchmarks/step_times.py benchmarks/configs/qwen3-30b-a3b --gpu-memory 12GiB \
    --routing synthetic:uniform --label "pace$i" 2>/tmp/s.err >> "$OUT/step_pace.jsonl" || tail -3 /tmp/s.err
  wait $PACE
  tail -1 "$OUT/step_pace.jsonl" | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); print(r['label'], r['step_ms_mean'], r['step_ms_deciles_1_3_5_7_9'], len(r['slow_steps']), r['os_totals'])"
done
