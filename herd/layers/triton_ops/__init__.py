"""Triton kernels for the GPU path (fused MoE, fused norms), imported only where triton is installed.

On CPU tensors they run only under Triton's interpreter (`TRITON_INTERPRET=1`, read when a kernel module is
first imported): that is how the CPU tests check them against the PyTorch paths they replace.
"""

from __future__ import annotations

import importlib.util


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None
