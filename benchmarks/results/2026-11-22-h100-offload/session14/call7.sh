#!/usr/bin/env bash
# Session 14, device call 7 (a fresh machine): its kind by the step-time probe, then the final Qwen3 and OLMoE
# uniform rows at the final code.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
ROOT=$PWD; OUT=${OUT:-/tmp/out}; T0=$(date +%s)
timeout 120 python3 benchmarks/step_times.py benchmarks/configs/qwen3-30b-a3b --gpu-memory 12GiB --routing synthetic:uniform \
  --steps 128 --label s14c7 > "$OUT/step_times_call7.jsonl" 2>/tmp/st.err; grep -v DEBUG /tmp/st.err | tail -2
python3 -c "
import json; r = json.loads(open('$OUT/step_times_call7.jsonl').readline())
print({k: r[k] for k in r if k.startswith('step_ms')}, 'slow', len(r.get('slow_steps', [])))"
echo "probe at $(( $(date +%s) - T0 )) s"
sed -n '/^row() {/,/^}/p' .s14/call6.sh > /tmp/row.sh; source /tmp/row.sh
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits -lms 200 > /tmp/nvml.csv 2>/dev/null &
row qwen3_12gib_uniform "$ROOT" qwen3-30b-a3b 12GiB 1,8 200
row olmoe_4gib_uniform "$ROOT" olmoe-1b-7b 4GiB 1,8 110
