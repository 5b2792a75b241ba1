"""Fake (meta) kernels of herd's CPU ops, so that torch.compile traces a decode step through them.

Each gives the output's shape and dtype from the inputs', as the C++ op computes them (gemv.cpp): a compiled
graph then calls the real op where eager code would, instead of leaving the kernels out of compiled steps.
Registered once, right after the library loads (`herd.kernels.cpu.gemv_ops`); a new op needs its fake here.
"""

from __future__ import annotations

import torch


def _rows_out(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], n))


def _gemv_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    torch._check(x.shape[-1] == w.shape[1], lambda: f"gemv_bf16: x has {x.shape[-1]} columns, w {w.shape[1]}")
    return _rows_out(x, w.shape[0])


def _gemv_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    torch._check(x.shape[-1] == q.shape[1], lambda: f"gemv_int8: x has {x.shape[-1]} columns, q {q.shape[1]}")
    return _rows_out(x, q.shape[0])


def _swiglu_experts_bf16(
    x: torch.Tensor, expert_ids: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    return x.new_empty((x.shape[0], down.shape[1]))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return x.new_empty(x.shape)  # contiguous, as the kernel writes it


def _paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    offsets: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return q.new_empty(q.shape)  # contiguous, in q's dtype


def _argmax_rows(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[:1], dtype=torch.long)


def _rope_qk_norm(qk: torch.Tensor, angles: torch.Tensor, rope: bool, norm: bool, eps: float) -> torch.Tensor:
    return qk.new_empty(qk.shape)  # contiguous, in qk's dtype


def _w4a16_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    return _rows_out(x, packed.shape[0])


def _decode_model_bf16(
    input_ids: torch.Tensor, positions: torch.Tensor, embed: torch.Tensor, *args: object
) -> tuple[torch.Tensor, torch.Tensor]:
    aux_layers = args[-1]
    assert isinstance(aux_layers, list)
    hidden = embed.new_empty((input_ids.shape[0], embed.shape[1]))
    return hidden, embed.new_empty((input_ids.shape[0], embed.shape[1] * len(aux_layers)))


def register() -> None:
    fakes = (
        ("gemv_bf16", _gemv_bf16),
        ("gemv_int8", _gemv_int8),
        ("rms_norm", _rms_norm),
        ("swiglu_experts_bf16", _swiglu_experts_bf16),
        ("paged_decode_attention", _paged_decode_attention),
        ("argmax_rows", _argmax_rows),
        ("w4a16_linear", _w4a16_linear),
        ("rope_qk_norm", _rope_qk_norm),
        ("decode_model_bf16", _decode_model_bf16),
    )
    for name, fake in fakes:
        torch.library.register_fake(f"herd_cpu::{name}", fake)
