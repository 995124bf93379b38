#!/usr/bin/env bash
# On the device machine: GPU tests, calibration, and moetier's resident bench of the OLMoE shape.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/machine.txt"
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)" | tee -a "$OUT/machine.txt"
git rev-parse HEAD 2>/dev/null | tee -a "$OUT/machine.txt"
timeout 240 python3 -m pytest -q -p no:logging tests/test_gpu.py > "$OUT/gpu_tests.log" 2>&1; grep -E "passed|failed|^FAILED|^E " "$OUT/gpu_tests.log" | head -40
python3 -m moetier.cli calibrate > "$OUT/calibration.json"; cat "$OUT/calibration.json"
timeout 300 python3 -m moetier.cli bench --model benchmarks/configs/olmoe-1b-7b --load-format dummy --dtype bfloat16 \
  --batch-sizes "${BATCHES:-1,8,64}" --prefill-lens 512,2048 > "$OUT/olmoe_moetier.json" 2> "$OUT/olmoe_moetier.err"
tail -5 "$OUT/olmoe_moetier.err"; cat "$OUT/olmoe_moetier.json"
