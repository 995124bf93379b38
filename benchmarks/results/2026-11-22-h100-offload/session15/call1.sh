#!/usr/bin/env bash
# Session 15, device call 1: GPU tests, host call costs, host time per layer (new), and batch-1 uniform Qwen3
# bench alternating new / old (311612a in .s15/old).
set -uo pipefail
export PYTHONUNBUFFERED=1
ROOT=$PWD; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; T0=$(date +%s)
at() { echo "-- $1 at $(( $(date +%s) - T0 )) s"; }
if [ "${TESTS:-1}" = 1 ]; then
  PYTHONPATH=$ROOT timeout 150 python3 -m pytest -q -p no:logging tests/test_gpu.py tests/test_disk_tier.py tests/test_calibrate.py > "$OUT/gpu_tests.log" 2>&1
  grep -E "passed|failed|^FAILED|^E " "$OUT/gpu_tests.log" | head -30; at tests
fi
if [ "${COSTS:-0}" = 1 ]; then
  PYTHONPATH=$ROOT timeout 90 python3 benchmarks/host_call_costs.py > "$OUT/host_call_costs.json" 2>/tmp/c.err; tail -2 /tmp/c.err; cat "$OUT/host_call_costs.json"; at costs
fi
host() {  # name pythonpath
  PYTHONPATH=$2 timeout 120 python3 benchmarks/host_time_offload.py benchmarks/configs/qwen3-30b-a3b --gpu-memory 12GiB \
    --routing synthetic:uniform --batch 1 > "$OUT/$1.txt" 2>/tmp/h.err; grep -v DEBUG /tmp/h.err | tail -2; head -c 900 "$OUT/$1.txt"; echo; at "$1"
}
for NAME in ${HOSTS:-host_old host_new}; do
  case $NAME in *new*) host "$NAME" "$ROOT" ;; *old*) host "$NAME" "$ROOT/.s15/old" ;; esac
done
bench() {  # name pythonpath
  (cd "$2" && PYTHONPATH=$2 timeout 115 python3 -m moetier.cli bench --model $ROOT/benchmarks/configs/qwen3-30b-a3b \
    --load-format dummy --dtype bfloat16 --gpu-memory 12GiB --prompt-len 512 --prefill-lens 512 --batch-sizes 1 \
    --output-len 128 --routing synthetic:uniform > "$OUT/$1.json" 2>/tmp/b.err)
  grep -v DEBUG /tmp/b.err | tail -2
  python3 - "$OUT/$1.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for d in r["decode"]: print(sys.argv[1], "b%d" % d["batch"], d["tok_s"], "eff", d.get("offload", {}).get("copy_efficiency"))
PY
  at "$1"
}
for NAME in ${ORDER:-new1 old1 new2 old2}; do
  case $NAME in new*) bench "ab_$NAME" "$ROOT" ;; old*) bench "ab_$NAME" "$ROOT/.s15/old" ;; esac
done
