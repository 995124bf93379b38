#!/usr/bin/env bash
# Session 14, device call 3: the final uniform rows at the session's code (OLMoE 4 GiB, Qwen3 12 GiB), then the
# step-time probe (slow steps: is this machine of the slow-host kind?).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; T0=$(date +%s)
TESTS=0 STAGE=uniform OUT=$OUT bash benchmarks/device_offload.sh 2>&1 | grep -v "^  prefill\|^  decode" | tail -8
python3 - "$OUT"/qwen3_12gib_uniform.json "$OUT"/olmoe_4gib_uniform.json <<'PY'
import json, sys
for f in sys.argv[1:]:
    r = json.load(open(f)); o = r.get("offload", {})
    print(f, "slots", o.get("num_slots"), "hit", o.get("hit_rate"), "static", o.get("static_hit_rate"), "replayed", o.get("replayed_hit_rate"),
          "nvml", r.get("gpu_bytes_nvml_process"), "load_s", r.get("load_s"))
    for p in r["prefill"]: print("  prefill", p["tok_s"], "eff", p.get("offload", {}).get("copy_efficiency"))
    for d in r["decode"]: print("  decode b%d" % d["batch"], d["tok_s"], "eff", d.get("offload", {}).get("copy_efficiency"))
PY
echo "rows at $(( $(date +%s) - T0 )) s"
timeout 150 python3 benchmarks/step_times.py benchmarks/configs/qwen3-30b-a3b --gpu-memory 12GiB --routing synthetic:uniform \
  --steps 128 --label s14 > "$OUT/step_times.jsonl" 2>/tmp/st.err; grep -v DEBUG /tmp/st.err | tail -2
python3 -c "
import json; r = json.loads(open('$OUT/step_times.jsonl').readline())
print({k: r[k] for k in r if k.startswith('step_ms') or k in ('slow_steps_count',)}, 'slow', len(r.get('slow_steps', [])))"
echo "all at $(( $(date +%s) - T0 )) s"
