#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh installs on the (offline) GPU machine into .gpu_wheels/
# (git-ignored; pass it as `carry` to the device call). x86_64 Linux, CPython $PY_VERSIONS (default 3.12;
# herd needs 3.11+). The call carries 64 MiB with the tree, so one version only, and without what a PyTorch
# image has (numpy) or what nothing imports here (hf_xet, kernels); gpu_check.sh installs them --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
rm -rf .gpu_wheels
for py in ${PY_VERSIONS:-3.12}; do
    "$PIP" download -q -d .gpu_wheels --only-binary=:all: --python-version "$py" \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        -r benchmarks/gpu_requirements.txt
done
rm -f .gpu_wheels/numpy-*.whl .gpu_wheels/hf_xet-*.whl .gpu_wheels/kernels-*.whl
du -sh .gpu_wheels
