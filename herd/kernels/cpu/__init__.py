"""CPU kernels of our own, compiled from C++ the first time they are needed (or by `make venv`).

Each is a torch op (`torch.ops.herd_cpu.*`) with a fake kernel (herd.kernels.cpu.fake): eager code and
compiled decode steps (--enable-torch-compile) both call them. The build needs a C++ compiler and the kernels
AVX-512F/BW/VL; without either, `gemv_ops()` answers None and callers keep PyTorch's kernels. int8_vnni.cpp
(W8A8 INT8 on AVX-512 VNNI) joins the same library; its ops have fake kernels (herd.kernels.cpu.int8_vnni) and a
PyTorch fallback where VNNI is missing. decode_attention.cpp (one query per sequence over the paged KV cache) and
argmax.cpp (greedy sampling's argmax per row) and rope_qk_norm.cpp (Llama 4's RoPE and qk-norm in one op) join it
too, their fakes in herd.kernels.cpu.fake, and so does int4_bf16.cpp (W4A16 on AVX512-BF16; its ops answer
whether the CPU has it). decode_layer.cpp runs a decode step's whole text model through the others.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = [
    Path(__file__).with_name(name)
    for name in (
        "gemv.cpp",
        "int8_vnni.cpp",
        "decode_attention.cpp",
        "argmax.cpp",
        "int4_bf16.cpp",
        "rope_qk_norm.cpp",
        "decode_layer.cpp",
        "claim_pool.cpp",
    )
]
# Included by the sources: part of the build's key.
HEADERS = [Path(__file__).with_name(name) for name in ("cpu_features.h", "claim_pool.h")]
# Rows of x up to which the weight-streaming kernels beat PyTorch's matmuls (benchmarks/gemv_cpu.py): they
# widen each weight vector once for up to four rows of x, so past a few rows the arithmetic, not the weight's
# bytes, is the cost.
GEMV_MAX_ROWS = 8


def build_dir() -> Path:
    # Keyed by the sources' hash and torch's version: worktrees and venvs never load each other's build.
    files = [*SOURCES, *HEADERS]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in files) + torch.__version__.encode()).hexdigest()
    root = Path(os.environ.get("HERD_KERNEL_CACHE", Path.home() / ".cache" / "herd" / "kernels"))
    return root / f"cpu-{digest[:16]}"


@functools.cache
def gemv_ops() -> object | None:
    """`torch.ops.herd_cpu` once its library is built and loaded; None where it cannot be built."""
    from torch.utils import cpp_extension

    directory = build_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name="herd_cpu_kernels",
            sources=[str(p) for p in SOURCES],
            # -fopenmp without -lgomp: ATen's parallel_for (a header) becomes OpenMP code whose runtime calls
            # resolve to the libgomp torch has already loaded, so the kernels share torch's threads; linking a
            # second OpenMP runtime would give the process two thread pools.
            extra_cflags=["-O3", "-fopenmp"],
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
    except (OSError, RuntimeError, ImportError) as e:
        logger.warning("CPU kernels not built (%s); using PyTorch's GEMV", e)
        return None
    if not torch.ops.herd_cpu.supported():
        logger.info("this CPU lacks AVX-512; using PyTorch's GEMV")
        return None
    from herd.kernels.cpu import fake

    fake.register()
    logger.info("herd's CPU kernels loaded from %s", directory)
    return torch.ops.herd_cpu


_enabled: bool | None = None


def enabled() -> bool:
    """The kernels are used where they build and the CPU has AVX-512, unless HERD_CPU_GEMV=0 (read once)."""
    # A plain global, not functools.cache: torch.compile reads it (as a guarded constant) inside a traced step.
    global _enabled
    if _enabled is None:
        _enabled = os.environ.get("HERD_CPU_GEMV", "1") != "0" and gemv_ops() is not None
    return _enabled


def rest_pool() -> None:
    """The kernels' idle pool workers sleep now instead of polling for the next call (claim_pool.cpp), where the
    kernels are in use."""
    if enabled():
        torch.ops.herd_cpu.rest_pool()
