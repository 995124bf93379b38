#!/usr/bin/env bash
# Session 15, device call 2 (a fresh machine): its kind by the step-time probe, the final Qwen3 and OLMoE uniform rows
# at the session's code, then batch-1 uniform Qwen3 old (70de0c5, .s15/old) against new once more.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
ROOT=$PWD; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; T0=$(date +%s)
timeout 120 python3 benchmarks/step_times.py benchmarks/configs/qwen3-30b-a3b --gpu-memory 12GiB --routing synthetic:uniform \
  --steps 128 --label s15c2 > "$OUT/step_times_call2.jsonl" 2>/tmp/st.err; grep -v DEBUG /tmp/st.err | tail -2
python3 -c "
import json; r = json.loads(open('$OUT/step_times_call2.jsonl').readline())
print({k: r[k] for k in r if k.startswith('step_ms')}, 'slow', len(r.get('slow_steps', [])))"
echo "probe at $(( $(date +%s) - T0 )) s"
TESTS=0 STAGE=uniform bash benchmarks/device_offload.sh 2>&1 | grep -E "json|decode|prefill|peak" | cut -c1-400
echo "rows at $(( $(date +%s) - T0 )) s"
HOSTS=none ORDER="${ORDER:-old1 new1}" TESTS=0 bash .s15/call1.sh 2>&1 | grep -E "eff|at "
