#!/usr/bin/env bash
# On the device machine: the tiered-offloading benchmark (dummy bf16 weights, the dummy routers'
# routing), in stages that each fit one device call; give COMMIT=<hash> (the device checkout has none). Every run is its own process; an nvidia-smi log gives each
# one's NVML peak (benchmarks/nvml_peak.py).
#   STAGE=small   GPU tests (TESTS=0 skips them), calibration, OLMoE-1B-7B at 4 GiB, Qwen3-30B-A3B at 12 GiB (+ naive baseline)
#   STAGE=mixtral Mixtral-8x7B at 24 and 40 GiB (+ naive baseline at 24 GiB)
#   STAGE=peers   transformers + accelerate offload at the same budgets; OLMoE served from disk
#   STAGE=replay  the same shapes driven by the routing of trained donors (benchmarks/results/traces/donor-*)
#   STAGE=uniform the final rows (128 new tokens) with seeded uniform routing (synthetic:uniform): GPU tests
#                 (TESTS=0 skips them), OLMoE-1B-7B at 4 GiB and Qwen3-30B-A3B at 12 GiB
#   STAGE=uniform-mixtral   Mixtral-8x7B at 24 GiB, the same way (one call: ~310 s)
#   STAGE=uniform-40  Mixtral-8x7B at 40 GiB, and OLMoE served from disk (2 GiB host cap, dummy routers)
#   STAGE=spread  why uniform Qwen3's batch-1 efficiency differs between processes: GPU tests (TESTS=0 skips
#                 them), expert copies from a store-sized arena torch-pinned and on huge pages
#                 (arena_copy_rate.py), bench's routing recorder on and off in one process (offload_ab.py)
#   STAGE=predict GPU tests (TESTS=0 skips them), then where the copy engine idles with and without next-layer
#                 prediction (benchmarks/profile_copy_gaps.py) for RUNS="shape:budget ..." (olmoe-1b-7b:4GiB):
#                 the dummy routers, uniform and donor routing, batch 1 and 8
#   STAGE=serve   the serving sweep on OLMoE-1B-7B at a 6 GiB budget, 32 sequences of 640 tokens (their KV
#                 cache leaves room for 76 of 1024 experts; carry .whl: the server's wheels)
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STAGE=${STAGE:-small}
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits -lms 200 > /tmp/nvml.csv 2>/dev/null &

bench() {  # name timeout script args...
  local name=$1 limit=$2 script=$3; shift 3
  timeout "$limit" python3 $script "$@" > "$OUT/$name.json" 2> "/tmp/$name.err"
  grep -v DEBUG "/tmp/$name.err" | tail -3
  python3 benchmarks/nvml_peak.py /tmp/nvml.csv "$OUT/$name.json" 2>&1 | tail -1
  python3 - "$OUT/$name.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(sys.argv[1], "load_s", r.get("load_s"), "offload", {k: v for k, v in r.get("offload", {}).items() if k != "layers"})
for p in r.get("prefill", []): print("  prefill", p)
for d in r.get("decode", []): print("  decode", d)
PY
}
offload() {  # name shape budget timeout extra...
  local name=$1 shape=$2 budget=$3 limit=$4; shift 4
  bench "$name" "$limit" "-m moetier.cli bench" --model benchmarks/configs/$shape --load-format dummy --dtype bfloat16 \
    --gpu-memory "$budget" --prompt-len 512 --prefill-lens 512 "$@"
}
naive() {
  local name=$1 shape=$2 budget=$3 limit=$4; shift 4
  bench "$name" "$limit" benchmarks/naive_offload.py --model benchmarks/configs/$shape --load-format dummy \
    --dtype bfloat16 --gpu-memory "$budget" --prompt-len 512 --prefill-lens 512 "$@"
}
peer() {  # name shape budget timeout extra...
  local name=$1 shape=$2 budget=$3 limit=$4; shift 4
  timeout "$limit" python3 benchmarks/hf_offload_peer.py --config benchmarks/configs/$shape --gpu-memory "$budget" \
    --max-seconds $((limit - 30)) "$@" > "$OUT/$name.json" 2> "/tmp/$name.err" || tail -5 "/tmp/$name.err"
  python3 benchmarks/nvml_peak.py /tmp/nvml.csv "$OUT/$name.json" 2>&1 | tail -1; cat "$OUT/$name.json"
}

gpu_tests() {  # timeout test-files...: unless TESTS=0 (the GPU tests passed at this code already), into gpu_tests.log
  local limit=$1; shift
  [ "${TESTS:-1}" = 1 ] || return 0
  timeout "$limit" python3 -m pytest -q -p no:logging "$@" > "$OUT/gpu_tests.log" 2>&1
  grep -E "passed|failed|^FAILED|^E " "$OUT/gpu_tests.log" | head -30
}

case $STAGE in
predict)
  gpu_tests 300 tests/test_gpu.py tests/test_disk_tier.py tests/test_calibrate.py
  for RUN in ${RUNS:-olmoe-1b-7b:4GiB}; do  # shape:budget ...
  SHAPE=${RUN%%:*}
  timeout "${LIMIT:-280}" python3 benchmarks/profile_copy_gaps.py benchmarks/configs/$SHAPE --gpu-memory "${RUN#*:}" \
    --batches 1,8 --routings "${ROUTINGS:-router,synthetic:uniform,replay:benchmarks/results/traces/donor-$SHAPE/heldout.npz}" \
    > "$OUT/copy_gaps_$SHAPE.jsonl" 2> "/tmp/gaps.err"; grep -v DEBUG /tmp/gaps.err | tail -3
  python3 - "$OUT/copy_gaps_$SHAPE.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line); p = r.pop("profile")
    print(r["routing"][:16], r["predictor"], r["batch"], "tok/s", r["tok_s"], "eff", r.get("copy_efficiency"),
          "hit", r["hit_rate"], "prec", r["prediction_precision"], "pf", r["prefetch_used"], "/", r["prefetch_loads"],
          "win", r["prefetch_window_s"], "copy", r["expert_copy_s"])
    print("   ", p)
PY
  done
  ;;
small)
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    echo "commit ${COMMIT:-unknown}"; free -g | head -2; } | tee "$OUT/machine.txt"
  gpu_tests 240 tests/test_gpu.py tests/test_disk_tier.py tests/test_calibrate.py
  # a crash (not a failed comparison) would crash the benchmarks too: stop here
  if [ "${TESTS:-1}" = 1 ] && grep -qE "^E +[A-Za-z]*(Runtime|Type|Attribute|Value|Index)Error" "$OUT/gpu_tests.log"; then
    exit 1
  fi
  timeout 90 python3 -m moetier.cli calibrate > "$OUT/calibration.json" 2>/dev/null; cat "$OUT/calibration.json"
  offload olmoe_4gib olmoe-1b-7b 4GiB 100 --batch-sizes 1,8 --output-len 64
  offload qwen3_12gib qwen3-30b-a3b 12GiB 170 --batch-sizes 1,8 --output-len 48
  naive qwen3_12gib_naive qwen3-30b-a3b 12GiB 120 --batch-sizes 1 --output-len 16
  if [ "$SECONDS" -lt 480 ]; then  # where an offloaded batch-8 decode step spends its time
    timeout 100 python3 benchmarks/profile_offload.py benchmarks/configs/olmoe-1b-7b --gpu-memory 4GiB --batch 8 \
      --steps 10 > "$OUT/profile_olmoe_b8.txt" 2>&1; head -c 2500 "$OUT/profile_olmoe_b8.txt"
  fi
  ;;
mixtral)
  timeout 60 python3 -m moetier.cli calibrate > /dev/null 2>&1
  offload mixtral_24gib mixtral-8x7b 24GiB 200 --batch-sizes 1,8 --output-len 16
  offload mixtral_40gib mixtral-8x7b 40GiB 170 --batch-sizes 1,8 --output-len 12
  naive mixtral_24gib_naive mixtral-8x7b 24GiB 150 --batch-sizes 1 --output-len 8
  if [ "$SECONDS" -lt 480 ]; then peer accelerate_olmoe_4gib olmoe-1b-7b 4GiB 90 --batch-sizes 1,8 --output-len 4; fi
  ;;
peers)
  offload olmoe_4gib_disk olmoe-1b-7b 4GiB 100 --cpu-memory 2GiB --batch-sizes 1 --output-len 16
  peer accelerate_qwen3_12gib qwen3-30b-a3b 12GiB 130 --batch-sizes 1 --output-len 3
  peer accelerate_mixtral_24gib mixtral-8x7b 24GiB 200 --batch-sizes 1 --output-len 3
  ;;
replay)  # a donor trace replayed in place of the dummy routers (consecutive trace tokens per step)
  T=benchmarks/results/traces
  offload mixtral_24gib_replay mixtral-8x7b 24GiB 230 --batch-sizes 1,8 --output-len 16 \
    --routing replay:$T/donor-mixtral-8x7b/heldout.npz
  offload qwen3_12gib_replay qwen3-30b-a3b 12GiB 170 --batch-sizes 1,8 --output-len 48 \
    --routing replay:$T/donor-qwen3-30b-a3b/heldout.npz
  offload olmoe_4gib_replay olmoe-1b-7b 4GiB 100 --batch-sizes 1,8 --output-len 64 \
    --routing replay:$T/donor-olmoe-1b-7b/heldout.npz
  ;;
uniform)  # every token's experts drawn uniformly: the reference the donor rows are read against
  gpu_tests 240 tests/test_gpu.py
  offload olmoe_4gib_uniform olmoe-1b-7b 4GiB 150 --batch-sizes 1,8 --output-len 128 --routing synthetic:uniform
  offload qwen3_12gib_uniform qwen3-30b-a3b 12GiB 250 --batch-sizes 1,8 --output-len 128 --routing synthetic:uniform
  ;;
uniform-mixtral)
  offload mixtral_24gib_uniform mixtral-8x7b 24GiB 560 --batch-sizes 1,8 --output-len 128 --routing synthetic:uniform
  ;;
uniform-40)
  offload olmoe_4gib_disk olmoe-1b-7b 4GiB 150 --cpu-memory 2GiB --batch-sizes 1 --output-len 16
  offload mixtral_40gib_uniform mixtral-8x7b 40GiB 420 --batch-sizes 1,8 --output-len 128 --routing synthetic:uniform
  ;;
spread)
  gpu_tests 240 tests/test_gpu.py
  for BACKING in torch huge; do
    timeout 150 python3 benchmarks/arena_copy_rate.py --backing $BACKING >> "$OUT/arena_copy_rate.jsonl" 2> /tmp/arena.err \
      || tail -3 /tmp/arena.err
  done
  cat "$OUT/arena_copy_rate.jsonl"
  PYTHONPATH=$PWD:$PWD/benchmarks timeout 200 python3 benchmarks/offload_ab.py benchmarks/configs/qwen3-30b-a3b \
    --gpu-memory 12GiB --routing synthetic:uniform --batch 1 --toggle recorder --rounds 3 --steps 16 \
    --max-model-len 640 > "$OUT/ab_recorder.jsonl" 2> /tmp/ab.err || tail -3 /tmp/ab.err
  cat "$OUT/ab_recorder.jsonl"
  ;;
serve)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
  LOG="$OUT/serve.log" OUT="$OUT/serve_olmoe_6gib.json" RATES=1,4,16,inf NUM_REQUESTS=64 DURATION=12 PYTHON=python3 \
    timeout 480 bash benchmarks/serve_sweep.sh --max-num-seqs 32 --max-model-len 640 --dtype bfloat16 --gpu-memory 6GiB \
    > "$OUT/serve_sweep.txt" 2>&1
  tail -c 2500 "$OUT/serve_sweep.txt"
  awk -F', ' '$2 > peak {peak = $2} END {print "server NVML peak MiB", peak, "of budget", 6 * 1024}' /tmp/nvml.csv \
    | tee "$OUT/serve_nvml_peak.txt"
  ;;
esac
kill %1 2>/dev/null
