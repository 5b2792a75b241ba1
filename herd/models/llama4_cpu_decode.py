"""A CPU decode step's Llama 4 decoder layers, each as one op (`herd_cpu::decode_layer_bf16`).

At one token a sequence, a small model's layer is a few dozen ops that read their weights in microseconds, and
the Python around them (module calls, views, casts, the router's topk and sigmoid) costs about as much as the
kernels: tiny's batch-1 step was ~2.3 ms, llama.cpp's whole step ~1.1. The op runs the layer's own ops in the
same order from C++, so its output equals the modules' bit for bit (tests/test_cpu_decode_layer.py).

It serves a step only where every part of every layer is what the op computes: bf16 weights on herd's GEMV
(`CPUGemvLinearMethod` / `CPUGemvFusedMoEMethod`), one GPU-less rank, no biases, one expert per token, at most
`GEMV_MAX_ROWS` rows that all attend through herd's paged decode kernel; anything else runs the modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from herd.kernels.cpu import GEMV_MAX_ROWS
from herd.kernels.cpu import enabled as cpu_kernels_enabled
from herd.layers.norm import RMSNorm
from herd.layers.quantization.cpu_gemv import CPUGemvFusedMoEMethod, kernel_weight

if TYPE_CHECKING:
    from herd.models.llama4_text import Llama4DecoderLayer, Llama4ForCausalLM


@dataclass
class FusedLayer:
    layer: Llama4DecoderLayer
    weights: list[torch.Tensor]  # decode_layer_bf16's, in its order
    dims: list[int]  # heads, kv heads, head_dim, rope, qk-norm

    def __call__(self, x: torch.Tensor, rope: torch.Tensor, q_scale: torch.Tensor | None, metadata: Any) -> Any:
        """The layer's output, or None where this step's attention is not the kernel's (then the modules run)."""
        attn = self.layer.self_attn.attn
        args = attn.backend.kernel_decode_args(metadata, attn.chunk_size is not None)
        if args is None or attn.kv_cache is None:
            return None
        k_cache, v_cache = attn.kv_cache
        q_scale = q_scale if self.layer.self_attn.spec.temperature_tuning else None
        return torch.ops.herd_cpu.decode_layer_bf16(
            x, rope, q_scale, self.weights, k_cache, v_cache, *args, self.dims, attn.scale, self.layer.self_attn.eps
        )


def fused_layers(model: Llama4ForCausalLM) -> list[FusedLayer] | None:
    """The model's layers as fused ops, or None where any part is not what the op computes (built once)."""
    if "_fused_layers" not in model.__dict__:
        layers = [_fused(layer) for layer in model.model.layers] if cpu_kernels_enabled() else []
        model.__dict__["_fused_layers"] = layers if layers and all(layers) else None
    return model.__dict__["_fused_layers"]


def fused_step(model: Llama4ForCausalLM, x: torch.Tensor) -> list[FusedLayer] | None:
    """The fused layers if they may serve a step of these hidden states (its attention is checked per layer)."""
    rows_ok = x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.shape[0] <= GEMV_MAX_ROWS
    if not rows_ok or torch.compiler.is_compiling():
        return None
    return fused_layers(model)


def _fused(layer: Llama4DecoderLayer) -> FusedLayer | None:
    attn, ff = layer.self_attn, layer.feed_forward
    norms = [layer.input_layernorm, layer.post_attention_layernorm]
    linears = [attn.qkv_proj, attn.o_proj]
    if hasattr(ff, "experts"):  # Llama4MoE
        if ff.top_k != 1 or ff.tp_size > 1 or ff.experts.ep_size > 1:
            return None
        if not isinstance(ff.experts.method, CPUGemvFusedMoEMethod) or not hasattr(ff.experts, "gate_up_proj_t"):
            return None
        linears += [ff.router, ff.shared_expert.gate_up_proj, ff.shared_expert.down_proj]
    else:
        linears += [ff.gate_up_proj, ff.down_proj]
    if any(linear.tp_size > 1 for linear in linears) or any(not _bf16_norm(n) for n in norms):
        return None
    kernel = [kernel_weight(linear) for linear in linears]
    if any(w is None for w in kernel):
        return None
    qkv, o, *ffn = kernel
    weights = [norms[0].weight, qkv, o, norms[1].weight]
    if hasattr(ff, "experts"):
        router, shared_gate_up, shared_down = ffn
        weights += [router, ff.experts.gate_up_proj_t, ff.experts.down_proj_t, shared_gate_up[None], shared_down[None]]
    else:
        weights += [ffn[0][None], ffn[1][None]]
    dims = [attn.num_heads, attn.num_kv_heads, attn.head_dim, int(attn.spec.use_rope), int(attn.spec.use_qk_norm)]
    return FusedLayer(layer, [w.detach() for w in weights], dims)


def _bf16_norm(norm: RMSNorm) -> bool:
    return norm.weight.dtype == torch.bfloat16
