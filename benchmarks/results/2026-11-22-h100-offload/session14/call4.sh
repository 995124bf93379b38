#!/usr/bin/env bash
# Session 14, device call 4: OLMoE-1B-7B 4 GiB prefill, new / old alternating (is call 3's 0.885 the code or the
# machine?), then the final Mixtral-8x7B 24 GiB uniform row at the session's code.
set -uo pipefail
export PYTHONUNBUFFERED=1
ROOT=$PWD; OUT=${OUT:-/tmp/out}; T0=$(date +%s)
pf() {  # name pythonpath
  (cd "$2" && PYTHONPATH=$2 timeout 90 python3 -m moetier.cli bench --model $ROOT/benchmarks/configs/olmoe-1b-7b \
    --load-format dummy --dtype bfloat16 --gpu-memory 4GiB --prompt-len 512 --prefill-lens 512 --batch-sizes 1 \
    --output-len 16 --routing synthetic:uniform > "$OUT/$1.json" 2>/tmp/b.err)
  grep -v DEBUG /tmp/b.err | tail -2
  python3 - "$OUT/$1.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for p in r["prefill"]: print(sys.argv[1], "prefill", p["tok_s"], "eff", p.get("offload", {}).get("copy_efficiency"))
PY
  echo "  at $(( $(date +%s) - T0 )) s"
}
for NAME in ${ORDER:-new1 old1 new2 old2}; do
  case $NAME in new*) pf "olmoe_pf_$NAME" "$ROOT" ;; old*) pf "olmoe_pf_$NAME" "$ROOT/.s14/old" ;; esac
done
cd "$ROOT" && TESTS=0 STAGE=uniform-mixtral OUT=$OUT PYTHONPATH=$ROOT bash benchmarks/device_offload.sh 2>&1 | tail -4 | cut -c1-600
python3 - "$OUT"/mixtral_24gib_uniform.json <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); o = r.get("offload", {})
print("slots", o.get("num_slots"), "hit", o.get("hit_rate"), "replayed", o.get("replayed_hit_rate"), "nvml", r.get("gpu_bytes_nvml_process"), "load_s", r.get("load_s"))
for p in r["prefill"]: print("  prefill", p["tok_s"], "eff", p.get("offload", {}).get("copy_efficiency"))
for d in r["decode"]: print("  decode b%d" % d["batch"], d["tok_s"], "eff", d.get("offload", {}).get("copy_efficiency"))
PY
echo "all at $(( $(date +%s) - T0 )) s"
