#!/usr/bin/env bash
# On the device machine: the serving sweep on OLMoE-1B-7B (resident, dummy bf16), then a prefill
# diagnostic: moetier bench with and without torch.compile fusion.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=$PWD:/tmp/site
DIR=$OUT
LOG="$DIR/serve.log" OUT="$DIR/serve_olmoe_resident.json" RATES=2,8,32,inf NUM_REQUESTS=96 DURATION=12 PYTHON=python3 \
  timeout 260 bash benchmarks/serve_sweep.sh --max-num-seqs 64 --dtype bfloat16 > "$DIR/serve_sweep.txt" 2>&1
tail -c 2500 "$DIR/serve_sweep.txt"
for compile in 1 0; do
  MOETIER_COMPILE=$compile timeout 150 python3 -m moetier.cli bench --model benchmarks/configs/olmoe-1b-7b --load-format dummy \
    --dtype bfloat16 --batch-sizes 1 --prefill-lens 512,2048 > "$DIR/olmoe_prefill_compile$compile.json" 2>/dev/null
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[1], r['prefill'], [(d['batch'], d['tok_s']) for d in r['decode']])" "$DIR/olmoe_prefill_compile$compile.json"
done
