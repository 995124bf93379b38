#!/usr/bin/env bash
# Session 14, device call 6: GPU tests at the final code, the final Qwen3 and OLMoE uniform rows, and old (311612a)
# against new on the same machine (OLMoE full row, Qwen3 batch 1).
set -uo pipefail
export PYTHONUNBUFFERED=1
ROOT=$PWD; OUT=${OUT:-/tmp/out}; T0=$(date +%s)
PYTHONPATH=$ROOT timeout 140 python3 -m pytest -q -p no:logging tests/test_gpu.py tests/test_disk_tier.py tests/test_calibrate.py > "$OUT/gpu_tests.log" 2>&1
grep -E "passed|failed|^FAILED|^E " "$OUT/gpu_tests.log" | head -20; echo "tests at $(( $(date +%s) - T0 )) s"
row() {  # name pythonpath shape budget batches limit
  (cd "$2" && PYTHONPATH=$2 timeout "$6" python3 -m moetier.cli bench --model $ROOT/benchmarks/configs/$3 \
    --load-format dummy --dtype bfloat16 --gpu-memory "$4" --prompt-len 512 --prefill-lens 512 --batch-sizes "$5" \
    --output-len 128 --routing synthetic:uniform > "$OUT/$1.json" 2>/tmp/b.err)
  grep -v DEBUG /tmp/b.err | tail -2
  python3 - "$OUT/$1.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); o = r.get("offload", {})
print(sys.argv[1], "slots", o.get("num_slots"), "hit", round(o.get("hit_rate"), 4), "replayed", o.get("replayed_hit_rate"), "nvml", r.get("gpu_bytes_nvml_process"), "load_s", r.get("load_s"))
for p in r["prefill"]: print("  prefill", p["tok_s"], "eff", p.get("offload", {}).get("copy_efficiency"))
for d in r["decode"]: print("  decode b%d" % d["batch"], d["tok_s"], "eff", d.get("offload", {}).get("copy_efficiency"))
PY
  echo "  at $(( $(date +%s) - T0 )) s"
}
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits -lms 200 > /tmp/nvml.csv 2>/dev/null &
row qwen3_12gib_uniform "$ROOT" qwen3-30b-a3b 12GiB 1,8 200
PYTHONPATH=$ROOT python3 benchmarks/nvml_peak.py /tmp/nvml.csv "$OUT/qwen3_12gib_uniform.json" 2>&1 | tail -1
row olmoe_4gib_uniform "$ROOT" olmoe-1b-7b 4GiB 1,8 110
PYTHONPATH=$ROOT python3 benchmarks/nvml_peak.py /tmp/nvml.csv "$OUT/olmoe_4gib_uniform.json" 2>&1 | tail -1
row olmoe_4gib_uniform_old "$ROOT/.s14/old" olmoe-1b-7b 4GiB 1,8 110
row qwen3_b1_old "$ROOT/.s14/old" qwen3-30b-a3b 12GiB 1 100
