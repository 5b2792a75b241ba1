"""A CPU decode step's Llama 4 decoder layers, each as one op (`herd_cpu::decode_layer_bf16`).

At one token a sequence, a small model's layer is a few dozen ops that read their weights in microseconds, and
the Python around them (module calls, views, casts, the router's topk and sigmoid) costs about as much as the
kernels: tiny's batch-1 step took 1.74 ms through the modules and 1.30 through these ops (one process, alternated;
benchmarks/RESULTS.md). The op runs the layer's own ops in the same order from C++, so its output equals the
modules' bit for bit (tests/test_cpu_decode_layer.py).

It serves a step only where every part of every layer is what the op computes: each linear layer's and expert
block's method names the kernel it runs for a few bf16 rows (`decode_weights`: herd's bf16 GEMV, W4A16, W8A8 and
W8A16 kernels), one GPU-less rank, no biases, one expert per token, at most `GEMV_MAX_ROWS` rows that all attend
through herd's paged decode kernel; anything else runs the modules. Scout-mini's INT4 step, replayed in one process,
took 22.7 ms through the modules and 18.6-19.3 through these ops (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from herd.kernels.cpu import GEMV_MAX_ROWS
from herd.kernels.cpu import enabled as cpu_kernels_enabled
from herd.layers.norm import RMSNorm
from herd.layers.quantization.base import DecodeWeights

if TYPE_CHECKING:
    from herd.layers.attention import PagedAttention
    from herd.layers.linear import LinearBase
    from herd.models.llama4_text import Llama4Attention, Llama4DecoderLayer, Llama4ForCausalLM


@dataclass
class FusedLayer:
    # Plain fields, though `paged`, `tuned` and `eps` are the attention module's: the step reads them every layer,
    # and through nn.Module's attribute lookup that costs more than the values are worth.
    weights: list[torch.Tensor]  # decode_layer_bf16's, in its order
    kernels: list[int]  # each linear layer's (DecodeKernel)
    dims: list[int]  # heads, kv heads, head_dim, rope, qk-norm
    attention: Llama4Attention  # its temperature (NoPE layers)
    paged: PagedAttention  # its KV cache, scale and pool
    tuned: bool  # whether its queries take the temperature
    eps: float

    @property
    def chunked(self) -> bool:
        return self.paged.chunk_size is not None


class FusedStep:
    """A step's fused layers and what they read of the step: per pool, the decode kernel's attention arguments."""

    def __init__(
        self, layers: list[FusedLayer], pools: dict[bool, tuple[torch.Tensor, ...]], q_scale: torch.Tensor | None
    ) -> None:
        self.layers, self.pools, self.q_scale = layers, pools, q_scale

    def __call__(self, i: int, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """Layer i's output for the residual stream x (rope: the step's rotation angles)."""
        layer = self.layers[i]
        assert layer.paged.kv_cache is not None
        return torch.ops.herd_cpu.decode_layer_bf16(
            x, rope, self.q_scale if layer.tuned else None, layer.weights, layer.kernels, *layer.paged.kv_cache,
            *self.pools[layer.chunked], layer.dims, layer.paged.scale, layer.eps,
        )  # fmt: skip


def fused_layers(model: Llama4ForCausalLM) -> list[FusedLayer] | None:
    """The model's layers as fused ops, or None where any part is not what the op computes (built once)."""
    if "_fused_layers" not in model.__dict__:
        layers = [_fused(layer) for layer in model.model.layers] if cpu_kernels_enabled() else []
        model.__dict__["_fused_layers"] = layers if layers and all(layers) else None
    return model.__dict__["_fused_layers"]


def fused_step(model: Llama4ForCausalLM, x: torch.Tensor, positions: torch.Tensor, metadata: Any) -> FusedStep | None:
    """The fused layers if they serve this step: few bf16 rows on the CPU, eager, every query on the decode kernel."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.shape[0] > GEMV_MAX_ROWS:
        return None
    layers = None if torch.compiler.is_compiling() else fused_layers(model)
    if layers is None or any(not _writable(layer.paged.kv_cache) for layer in layers):
        return None
    pools = {}
    for chunked in {layer.chunked for layer in layers}:
        args = layers[0].paged.backend.kernel_decode_args(metadata, chunked)
        if args is None:
            return None
        pools[chunked] = args
    tuned = [layer.attention for layer in layers if layer.tuned]
    return FusedStep(layers, pools, tuned[0].temperature(positions) if tuned else None)


def _fused(layer: Llama4DecoderLayer) -> FusedLayer | None:
    attn, ff = layer.self_attn, layer.feed_forward
    norms = [layer.input_layernorm, layer.post_attention_layernorm]
    linears = [_linear(attn.qkv_proj), _linear(attn.o_proj)]
    if hasattr(ff, "experts"):  # Llama4MoE, else Llama4MLP
        if ff.top_k != 1 or ff.tp_size > 1 or ff.experts.ep_size > 1:
            return None
        experts = ff.experts.method.decode_weights(ff.experts)
        linears += [_linear(ff.router), *(experts or [None]), *_mlp(ff.shared_expert)]
    else:
        linears += _mlp(ff)
    if any(linear is None for linear in linears) or any(not _bf16_norm(n) for n in norms):
        return None
    weights = [norms[0].weight, norms[1].weight]
    for _, tensors in linears:  # type: ignore[misc]
        weights += tensors
    dims = [attn.num_heads, attn.num_kv_heads, attn.head_dim, int(attn.spec.use_rope), int(attn.spec.use_qk_norm)]
    kernels = [int(kernel) for kernel, _ in linears]  # type: ignore[misc]
    fused = FusedLayer(
        [w.detach() for w in weights], kernels, dims, attn, attn.attn, attn.spec.temperature_tuning, attn.eps
    )
    return fused


def _linear(layer: LinearBase) -> DecodeWeights | None:
    if layer.tp_size > 1 or layer.bias is not None:
        return None
    return layer.method.decode_weights(layer)


def _mlp(mlp: torch.nn.Module) -> list[DecodeWeights | None]:
    """A dense MLP (or the shared expert) as the op's one-expert block: each tensor with a leading dimension of 1."""
    parts = [_linear(mlp.gate_up_proj), _linear(mlp.down_proj)]
    return [None if p is None else (p[0], [t[None] for t in p[1]]) for p in parts]


def _writable(kv_cache: tuple[torch.Tensor, torch.Tensor] | None) -> bool:
    """Whether the op can write this step's K and V into the layer's cache (it writes contiguous caches)."""
    return kv_cache is not None and kv_cache[0].is_contiguous() and kv_cache[1].is_contiguous()


def _bf16_norm(norm: RMSNorm) -> bool:
    return norm.weight.dtype == torch.bfloat16
