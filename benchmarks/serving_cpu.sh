#!/usr/bin/env bash
# herd's server on the CPU, measured with herd's sglang.bench_serving-compatible client.
# Model: a Scout-shaped small model (benchmarks/configs/scout_dummy.json: 16 experts, chunked
# attention, the real Llama 4 vocabulary and tokenizer) with random weights (--load-format dummy).
# Profiles: latency (concurrency 1) and throughput (concurrency 16). Prints the two result blocks;
# the JSONL records go to $WORK/serving_cpu.jsonl.
#
#   bash benchmarks/serving_cpu.sh            # after `make venv`
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${WORK:-/tmp/herd-serving-cpu}
PORT=${PORT:-30123}
INPUT_LEN=${INPUT_LEN:-256}
OUTPUT_LEN=${OUTPUT_LEN:-64}

mkdir -p "$WORK/model"
cp benchmarks/configs/scout_dummy.json "$WORK/model/config.json"
cp "$("$PY" -c 'import llama_models, pathlib; print(pathlib.Path(llama_models.__file__).parent / "llama4" / "tokenizer.model")')" "$WORK/model/"

"$PY" -m herd.launch_server --model-path "$WORK/model" --load-format dummy --dtype bfloat16 \
    --port "$PORT" --log-level warning &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    sleep 0.5
done

bench() {  # $1 = concurrency, $2 = number of prompts
    "$PY" -m herd.bench_serving --backend sglang-oai --port "$PORT" --dataset-name random \
        --random-input-len "$INPUT_LEN" --random-output-len "$OUTPUT_LEN" --random-range-ratio 1.0 \
        --num-prompts "$2" --max-concurrency "$1" --warmup-requests 2 --seed 1 \
        --output-file "$WORK/serving_cpu.jsonl" --disable-tqdm
}
echo "### latency profile (concurrency 1)"
bench 1 8
echo "### throughput profile (concurrency 16)"
bench 16 64
