"""W8A8 INT8 linear layers: INT8 weights (one scale per output row) times activations quantized per token.

`w8a8_linear` runs herd's AVX-512 VNNI kernel (int8_vnni.cpp, `torch.ops.herd_cpu.w8a8_int8_linear`) on a CPU
that has VNNI, and otherwise the same arithmetic in PyTorch (`w8a8_reference`: `torch._int_mm`, exact int32
sums), so both give the same numbers. The kernel reads the weight packed by `pack_for_vnni` (strips of four rows
interleaved per 64 inputs); `prepare_weight` packs it where the kernel will run and leaves it as is elsewhere.

The quantization of x is fixed here, in fp32: s = max|x| / 127 per row,
x_q = clamp(round(x * (127 / max|x|)), -127, 127), and y = (float(x_q @ w_q.T) * s) * w_scale in x's dtype.

The ops get fake kernels (shape and dtype only) so that they can sit inside a torch.compile'd graph.
"""

from __future__ import annotations

import functools
import logging

import torch

from herd.kernels.cpu import enabled, gemv_ops

logger = logging.getLogger(__name__)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (int8 [..., K], fp32 scales [..., 1]), with the kernel's fp32 operations."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    # Divisions by full tensors: PyTorch computes `127.0 / t` as 127 * (1 / t), which rounds differently from the
    # kernel's 127 / amax and moves values that land near .5.
    c127 = torch.full_like(amax, 127.0)
    inv = torch.where(amax > 0, c127 / amax, torch.zeros_like(amax))
    return torch.round(xf * inv).clamp(-127, 127).to(torch.int8), amax / c127


def w8a8_reference(x: torch.Tensor, q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ (q [N, K] * w_scale [N]).T with x quantized per token, in PyTorch ops (any device)."""
    rows = x.reshape(-1, x.shape[-1])
    xq, x_scale = quantize_per_token(rows)
    # Off the CPU a correctness path, not a fast one: float64 holds every int32 sum exactly.
    on_cpu = rows.device.type == "cpu"
    acc = torch._int_mm(xq, q.t()) if on_cpu else (xq.double() @ q.double().t()).to(torch.int32)
    out = acc.float() * x_scale * w_scale.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], q.shape[0])


STRIP_ROWS = 4  # int8_vnni.cpp's kRows
STEP = 64  # inputs per VNNI step


def pack_for_vnni(q: torch.Tensor) -> torch.Tensor:
    """INT8 [N, K] -> the kernel's layout: rows zero-padded to a multiple of 4 and inputs to a multiple of 64, then
    [N / 4, K / 64, 4, 64], so that each strip of four rows is read as one contiguous stream."""
    n, k = q.shape
    rows, cols = -(-n // STRIP_ROWS) * STRIP_ROWS, -(-k // STEP) * STEP
    padded = torch.zeros(rows, cols, dtype=torch.int8, device=q.device)
    padded[:n, :k] = q
    return padded.view(rows // STRIP_ROWS, STRIP_ROWS, cols // STEP, STEP).transpose(1, 2).contiguous()


def _register_fakes() -> None:
    # The output's columns come from q_sum (one per weight row): the packed weight's shape is padded.
    @torch.library.register_fake("herd_cpu::w8a8_int8_linear")
    def _(x: torch.Tensor, q: torch.Tensor, w_scale: torch.Tensor, q_sum: torch.Tensor) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], q_sum.shape[0]))

    @torch.library.register_fake("herd_cpu::int8_mm_vnni")
    def _(xq: torch.Tensor, q: torch.Tensor, q_sum: torch.Tensor) -> torch.Tensor:
        return xq.new_empty((xq.shape[0], q_sum.shape[0]), dtype=torch.int32)


@functools.cache
def vnni_ops() -> object | None:
    """`torch.ops.herd_cpu` where the kernels are built and this CPU has AVX-512 VNNI; else None (logged once)."""
    ops = gemv_ops()
    if ops is None:
        return None
    _register_fakes()
    if not torch.ops.herd_cpu.vnni_supported():
        logger.info("this CPU lacks AVX-512 VNNI: W8A8 INT8 layers run on torch._int_mm")
        return None
    return ops


_vnni_enabled: bool | None = None


def vnni_enabled() -> bool:
    """The VNNI kernel is used where it is built and supported, unless HERD_CPU_GEMV=0 (read once)."""
    # A plain global, not functools.cache: a compiled decode step reads it (as a guarded constant) while tracing.
    global _vnni_enabled
    if _vnni_enabled is None:
        _vnni_enabled = enabled() and vnni_ops() is not None
    return _vnni_enabled


def prepare_weight(q: torch.Tensor) -> torch.Tensor:
    """The form `w8a8_linear` takes q [N, K] in on q's device: packed for the kernel, or as is."""
    return pack_for_vnni(q) if q.device.type == "cpu" and vnni_enabled() else q


def w8a8_linear(x: torch.Tensor, q: torch.Tensor, w_scale: torch.Tensor, q_sum: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype; q int8 from `prepare_weight` (of [N, K]), w_scale [N] fp32, q_sum [N]
    int32 = the sum of each row of q."""
    if x.device.type == "cpu" and vnni_enabled():
        return torch.ops.herd_cpu.w8a8_int8_linear(x, q, w_scale, q_sum)
    return w8a8_reference(x, q, w_scale)
