#!/usr/bin/env bash
# On the device machine: GPU tests, calibration, moetier's resident bench of the OLMoE-1B-7B and
# Qwen3-30B-A3B shapes (dummy bf16 weights). Peers run separately (benchmarks/device_peers.sh).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  echo "commit ${COMMIT:-unknown}"; } | tee "$OUT/machine.txt"
timeout 300 python3 -m pytest -q -p no:logging tests/test_gpu.py > "$OUT/gpu_tests.log" 2>&1
grep -E "passed|failed|^FAILED|^E " "$OUT/gpu_tests.log" | head -30
python3 -m moetier.cli calibrate > "$OUT/calibration.json" 2>/dev/null; cat "$OUT/calibration.json"
for shape in olmoe-1b-7b qwen3-30b-a3b; do
  timeout 270 python3 -m moetier.cli bench --model benchmarks/configs/$shape --load-format dummy --dtype bfloat16 \
    --batch-sizes 1,8,64 --prefill-lens 512,2048 > "$OUT/${shape}_moetier.json" 2> "$OUT/${shape}_moetier.err"
  grep -v DEBUG "$OUT/${shape}_moetier.err" | tail -3
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[1], [(d['batch'], d['tok_s'], d.get('roofline_fraction')) for d in r['decode']], [(p['tokens'], p['tok_s']) for p in r['prefill']])" "$OUT/${shape}_moetier.json"
done
