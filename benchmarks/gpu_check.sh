#!/usr/bin/env bash
# Everything issue 19 checks on a GPU, in one call of at most 8 minutes:
#   1. the GPU test subset: triton attention / fused MoE / fused norm kernels against the PyTorch reference
#      on CUDA, the engine on the triton backend against transformers, decode through captured CUDA graphs
#      == eager (tests/test_triton_attention.py, test_triton_ops.py, test_cuda_graphs.py);
#   2. benchmarks/gpu_decode.py on Scout-shaped dummy weights against transformers eager, with the HBM
#      roofline and the targets checked (benchmarks/check_gpu_targets.py);
#   3. quantized (issue 20): the W4A16 Triton GEMM / fused MoE, compressed-tensors FP8 and W4A16 checkpoints
#      and --quantization fp8 | w4a16 against transformers on CUDA, then benchmarks/gpu_quant.py (48-layer
#      Scout W4A16: fits with >= 16k KV tokens? decode <= 5 ms/token? FP8 experts vs bf16 on 8 layers).
# GPU_CHECK_SECTIONS picks sections (default "main quant"; about 8 + 6 minutes): "quant" alone for issue 20.
# The GPU machine is offline: run benchmarks/gpu_wheels.sh here first and carry .gpu_wheels/ along.
# Results go to $OUT (the device call's folder) or benchmarks/out/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
exec > >(tee "$OUT/gpu_check.log") 2>&1

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"

echo "== packages"
if ! $PY -c "import transformers, pytest, tokenizers, tiktoken, jinja2, PIL, httpx" 2>/dev/null; then
    if [ -d .gpu_wheels ]; then
        $PY -m pip install -q --no-index --no-deps .gpu_wheels/*.whl \
            || echo "wheel install failed: rebuild .gpu_wheels with PY_VERSIONS set to the version above"
    else
        echo "missing packages and no .gpu_wheels/: run benchmarks/gpu_wheels.sh and carry .gpu_wheels"
    fi
fi

SECTIONS=${GPU_CHECK_SECTIONS:-main quant}
tests_rc=0 bench_rc=0 quant_rc=0
if [[ " $SECTIONS " == *" main "* ]]; then
    echo "== GPU tests"
    timeout 200 $PY -m pytest -q -p no:cacheprovider --durations=5 \
        tests/test_triton_attention.py tests/test_triton_ops.py tests/test_cuda_graphs.py
    tests_rc=$?

    echo "== Scout-shaped decode and prefill"
    timeout 240 $PY benchmarks/gpu_decode.py --out "$OUT/gpu_decode.json"
    bench_rc=$?
    [ -f "$OUT/gpu_decode.json" ] && $PY benchmarks/gpu_decode.py --check-targets "$OUT/gpu_decode.json"
fi
if [[ " $SECTIONS " == *" quant "* ]]; then
    echo "== quantized: W4A16 kernels, compressed-tensors checkpoints, --quantization (issue 20)"
    timeout 150 $PY -m pytest -q -p no:cacheprovider --durations=5 \
        tests/test_triton_weight_only.py tests/test_quantization_ct.py tests/test_quantization_online.py
    quant_rc=$?
    echo "== quantized Scout: 48-layer W4A16 fit and decode, FP8 experts vs bf16"
    timeout 240 $PY benchmarks/gpu_quant.py --out "$OUT/gpu_quant.json" || quant_rc=1
fi
echo "tests rc=$tests_rc benchmark rc=$bench_rc quantized rc=$quant_rc"
exit $(( tests_rc || bench_rc || quant_rc ))
