#!/usr/bin/env bash
# Starts `moetier serve` on a config-only model with dummy weights (default: the OLMoE-1B-7B shape),
# sweeps request rates up to saturation with benchmarks/serve_load.py, prints its JSON, stops the server.
#
#   benchmarks/serve_sweep.sh                                  # resident, defaults below
#   RATES=1,4,16,inf OUT=olmoe.json benchmarks/serve_sweep.sh --max-num-seqs 64   # extra args go to `moetier serve`
#
# Environment: MODEL (config dir), RATES, NUM_REQUESTS, DURATION (s per finite rate), PROMPT_LEN, OUTPUT_LEN,
# PORT, PYTHON, OUT (JSON file), LOG (server log), STARTUP_TIMEOUT (s).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-benchmarks/configs/olmoe-1b-7b}
RATES=${RATES:-1,2,4,8,16,32,inf}
NUM_REQUESTS=${NUM_REQUESTS:-128}
DURATION=${DURATION:-30}
PROMPT_LEN=${PROMPT_LEN:-512}
OUTPUT_LEN=${OUTPUT_LEN:-128}
PORT=${PORT:-8011}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-}
LOG=${LOG:-/tmp/moetier-serve-sweep.log}
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-900}

"$PYTHON" -m moetier.cli serve --load-format dummy --model "$MODEL" --port "$PORT" --max-queue 100000 "$@" \
    >"$LOG" 2>&1 &
SERVER=$!
stop_server() {
    kill -TERM "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
}
trap stop_server EXIT

ready=0
for ((i = 0; i < STARTUP_TIMEOUT * 2; i++)); do
    if ! kill -0 "$SERVER" 2>/dev/null; then
        echo "moetier serve exited during startup; its log ($LOG):" >&2
        cat "$LOG" >&2
        exit 1
    fi
    if "$PYTHON" -c "import httpx, sys; sys.exit(httpx.get('http://127.0.0.1:$PORT/health').status_code != 200)" \
        2>/dev/null; then
        ready=1
        break
    fi
    sleep 0.5
done
if [[ $ready != 1 ]]; then
    echo "moetier serve did not become healthy within ${STARTUP_TIMEOUT} s; its log: $LOG" >&2
    exit 1
fi

args=(--url "http://127.0.0.1:$PORT" --rates "$RATES" --num-requests "$NUM_REQUESTS" --duration "$DURATION"
      --prompt-len "$PROMPT_LEN" --output-len "$OUTPUT_LEN")
if [[ -n "$OUT" ]]; then
    args+=(--output "$OUT")
fi
"$PYTHON" benchmarks/serve_load.py "${args[@]}"
