"""A CPU decode step's Llama 4 text model as one op (`herd_cpu::decode_model_bf16`).

At one token a sequence, a small model's layer is a few dozen ops that read their weights in microseconds, and
the Python around them (module calls, views, casts, the router's topk and sigmoid) costs about as much as the
kernels: tiny's batch-1 step took 1.74 ms through the modules and 1.30 with a layer as one op (one process,
alternated; benchmarks/RESULTS.md). The op runs the modules' own ops in the same order from C++, from the embedding
to the final norm (each layer as decode_layer.cpp's `decode_layer`), so its output equals the modules' bit
for bit (tests/test_cpu_decode_layer.py); the LM head and the sampler stay outside, where every step's logits go.

It serves a step only where every part of every layer is what the op computes: each linear layer's and expert
block's method names the kernel it runs for a few bf16 rows (`decode_weights`: herd's bf16 GEMV, W4A16, W8A8 and
W8A16 kernels), one GPU-less rank, no biases, one expert per token, at most `GEMV_MAX_ROWS` rows that all attend
through herd's paged decode kernel; anything else runs the modules. Scout-mini's INT4 step, replayed in one process,
took 22.7 ms through the modules and 18.6-19.3 through the per-layer ops (benchmarks/RESULTS.md).
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
    from herd.models.llama4_text import Llama4DecoderLayer, Llama4ForCausalLM


@dataclass
class FusedLayer:
    weights: list[torch.Tensor]  # the norms', then each linear layer's, in decode_layer.cpp's order
    kernels: list[int]  # each linear layer's (DecodeKernel)
    dims: list[int]  # heads, kv heads, head_dim, rope, qk-norm, temperature (NoPE layers' queries)
    paged: PagedAttention  # its KV cache, scale and pool

    @property
    def chunked(self) -> bool:
        return self.paged.chunk_size is not None


@dataclass
class FusedModel:
    """The text model's decode-step arguments of `decode_model_bf16` that do not change between steps."""

    attention: list[PagedAttention]  # each layer's: its KV cache, and the backend that lays out a step
    weights: list[torch.Tensor]  # every layer's, in layer order
    kernels: list[int]
    layer_kernels: list[int]  # how many of `kernels` each layer has
    layer_pools: list[int]  # which pool's attention arguments each layer reads: its index in `pool_kinds`
    pool_kinds: list[bool]  # chunked or not, per pool in use
    dims: list[int]
    scales: list[float]
    temperature: list[float]  # floor_scale and attn_scale, or empty where no layer takes them
    embed: torch.Tensor
    inv_freq: torch.Tensor
    norm: torch.Tensor
    eps: float


class FusedStep:
    """A step's fused model and what it reads of the step: the layers' KV caches and, per pool, the decode kernel's
    attention arguments."""

    def __init__(
        self, fused: FusedModel, caches: list[torch.Tensor], pools: list[torch.Tensor], aux_layer_ids: tuple[int, ...]
    ) -> None:
        self.fused, self.caches, self.pools, self.aux_layer_ids = fused, caches, pools, aux_layer_ids

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The final norm's output for these tokens, and the auxiliary layers' outputs side by side."""
        f = self.fused
        return torch.ops.herd_cpu.decode_model_bf16(
            input_ids, positions, f.embed, f.inv_freq, f.weights, f.kernels, f.layer_kernels, self.caches, self.pools,
            f.layer_pools, f.dims, f.scales, f.temperature, f.norm, f.eps, self.aux_layer_ids,
        )  # fmt: skip


def fused_model(model: Llama4ForCausalLM) -> FusedModel | None:
    """The model as the fused op's arguments, or None where any part is not what the op computes (built once)."""
    if "_fused_model" not in model.__dict__:
        model.__dict__["_fused_model"] = _fused_model(model) if cpu_kernels_enabled() else None
    return model.__dict__["_fused_model"]


def fused_step(model: Llama4ForCausalLM, input_ids: torch.Tensor, metadata: Any) -> FusedStep | None:
    """The fused model if it serves this step: few rows on the CPU, eager, every query on the decode kernel."""
    if input_ids.device.type != "cpu" or input_ids.shape[0] > GEMV_MAX_ROWS or torch.compiler.is_compiling():
        return None
    fused = fused_model(model)
    if fused is None:
        return None
    caches: list[torch.Tensor] = []
    for attention in fused.attention:
        if not _writable(attention.kv_cache):
            return None
        caches += attention.kv_cache  # type: ignore[arg-type]
    pools: list[torch.Tensor] = []
    for chunked in fused.pool_kinds:
        args = fused.attention[0].backend.kernel_decode_args(metadata, chunked)
        if args is None:
            return None
        pools += args
    return FusedStep(fused, caches, pools, model.aux_layer_ids)


def _fused_model(model: Llama4ForCausalLM) -> FusedModel | None:
    embed, norm = model.model.embed_tokens, model.model.norm
    if embed.tp_size > 1 or embed.weight.dtype != torch.bfloat16 or not _bf16_norm(norm):
        return None
    layers = [_fused(layer) for layer in model.model.layers]
    if not layers or not all(layers):
        return None
    fused: list[FusedLayer] = layers  # type: ignore[assignment]
    attentions = [layer.self_attn for layer in model.model.layers]
    if any(a.eps != norm.eps for a in attentions):
        return None  # the op normalises every layer with one epsilon
    pool_kinds = sorted({layer.chunked for layer in fused})
    tuned = [a for a in attentions if a.spec.temperature_tuning]
    return FusedModel(
        attention=[layer.paged for layer in fused],
        weights=[w for layer in fused for w in layer.weights],
        kernels=[k for layer in fused for k in layer.kernels],
        layer_kernels=[len(layer.kernels) for layer in fused],
        layer_pools=[pool_kinds.index(layer.chunked) for layer in fused],
        pool_kinds=pool_kinds,
        dims=[d for layer in fused for d in layer.dims],
        scales=[layer.paged.scale for layer in fused],
        temperature=[float(tuned[0].floor_scale), float(tuned[0].attn_scale)] if tuned else [],
        embed=embed.weight.detach(),
        inv_freq=model.inv_freq,
        norm=norm.weight.detach(),
        eps=norm.eps,
    )


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
    spec = attn.spec
    dims = [attn.num_heads, attn.num_kv_heads, attn.head_dim, spec.use_rope, spec.use_qk_norm, spec.temperature_tuning]
    kernels = [int(kernel) for kernel, _ in linears]  # type: ignore[misc]
    return FusedLayer([w.detach() for w in weights], kernels, [int(d) for d in dims], attn.attn)


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
