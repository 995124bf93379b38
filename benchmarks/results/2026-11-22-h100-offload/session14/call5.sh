#!/usr/bin/env bash
set -uo pipefail
export PYTHONUNBUFFERED=1
ROOT=$PWD; OUT=${OUT:-/tmp/out}; T0=$(date +%s)
PYTHONPATH=$ROOT timeout 150 python3 .s14/prefill_toggles.py benchmarks/configs/olmoe-1b-7b --gpu-memory 4GiB \
  --routing synthetic:uniform > "$OUT/prefill_toggles.jsonl" 2>/tmp/t.err; grep -v DEBUG /tmp/t.err | tail -3
python3 - "$OUT/prefill_toggles.jsonl" <<'PY'
import json, sys, collections
d = collections.defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line); d[r["config"]].append(r["ms"])
for k, v in d.items(): print(k, v, "median", sorted(v)[len(v) // 2])
PY
echo "toggles at $(( $(date +%s) - T0 )) s"
for NAME in host_pf_new host_pf_old; do
  case $NAME in *new) P=$ROOT ;; *old) P=$ROOT/.s14/old ;; esac
  PYTHONPATH=$P timeout 130 python3 benchmarks/host_time_offload.py benchmarks/configs/olmoe-1b-7b --gpu-memory 4GiB \
    --routing synthetic:uniform --prefill 512 > "$OUT/$NAME.txt" 2>/tmp/h.err; grep -v DEBUG /tmp/h.err | tail -2
  head -1 "$OUT/$NAME.txt" | cut -c1-1600; echo "  at $(( $(date +%s) - T0 )) s"
done
