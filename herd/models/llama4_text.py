"""The Llama 4 text decoder over a flattened token batch.

Parameter names follow the Hugging Face checkpoint (without the `language_model.` prefix), except that
q/k/v and gate/up are fused matmuls whose weight_loaders fill them from the separate HF tensors. Inputs
are the new tokens of every sequence in the batch on one axis (`input_ids: [T]`, `positions: [T]`);
attention finds each sequence's context in the paged KV cache through the backend's step metadata.
Linear layers and experts come from a `LayerFactory`, which owns tensor-parallel slicing and weight
formats: this file is plain PyTorch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from herd.config import LayerSpec, ModelConfig
from herd.layers.attention import AttentionBackend, PagedAttention
from herd.layers.factory import LayerFactory
from herd.layers.norm import RMSNorm, add_rms_norm
from herd.layers.rotary import rope_and_qk_norm, rope_angles, rope_inv_freq
from herd.layers.vocab import VocabParallelEmbedding, gather_vocab
from herd.models.llama4_cpu_decode import fused_step


class Llama4Attention(nn.Module):
    def __init__(
        self, config: ModelConfig, spec: LayerSpec, factory: LayerFactory, backend: AttentionBackend, prefix: str
    ) -> None:
        super().__init__()
        self.spec = spec
        head_dim = self.head_dim = config.head_dim
        self.eps = config.rms_norm_eps
        self.floor_scale, self.attn_scale = config.floor_scale, config.attn_scale
        self.qkv_proj = factory.qkv(
            f"{prefix}.qkv_proj",
            config.hidden_size,
            head_dim,
            config.num_heads,
            config.num_kv_heads,
            bias=config.attention_bias,
        )
        q_size, kv_size, _ = self.qkv_proj.output_sizes_per_rank
        self.num_heads, self.num_kv_heads = q_size // head_dim, kv_size // head_dim  # this rank's
        self.o_proj = factory.row(
            f"{prefix}.o_proj", config.num_heads * head_dim, config.hidden_size, bias=config.attention_bias
        )
        chunk_size = config.attention_chunk_size if spec.chunked else None
        self.attn = PagedAttention(spec.index, head_dim, head_dim**-0.5, chunk_size, backend)

    def forward(
        self,
        x: torch.Tensor,  # [T, H]
        positions: torch.Tensor,  # [T]
        rope: torch.Tensor,  # [T, head_dim // 2] complex rotation angles
        metadata: Any,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q_kv = (self.num_heads + self.num_kv_heads) * self.head_dim
        # q and k side by side as heads: RoPE and qk-norm treat every head alike, so one call serves both.
        qk = qkv[:, :q_kv].unflatten(-1, (self.num_heads + self.num_kv_heads, self.head_dim))
        v = qkv[:, q_kv:].unflatten(-1, (self.num_kv_heads, self.head_dim))  # [T, n_kv, D]
        qk = rope_and_qk_norm(qk, rope, self.spec.use_rope, self.spec.use_qk_norm, self.eps)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)  # [T, n_heads, D], [T, n_kv_heads, D]
        if self.spec.temperature_tuning:
            q = (q * self.temperature(positions)[:, None, None]).to(q.dtype)
        out = self.attn(q, k, v, metadata)
        return self.o_proj(out.flatten(-2))

    def temperature(self, positions: torch.Tensor) -> torch.Tensor:
        """NoPE layers sharpen attention with the query's absolute position (arXiv 2501.19399): fp32 [T]."""
        return torch.log1p(torch.floor((positions.float() + 1.0) / self.floor_scale)) * self.attn_scale + 1.0


class Llama4MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, factory: LayerFactory, prefix: str) -> None:
        super().__init__()
        self.gate_up_proj = factory.column(
            f"{prefix}.gate_up_proj", hidden_size, [intermediate_size] * 2, shard_ids=(0, 1)
        )
        self.down_proj = factory.row(f"{prefix}.down_proj", intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.gate_up_proj.method.swiglu(self.gate_up_proj, self.down_proj, x)
        if fused is not None:
            return fused
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Llama4MoE(nn.Module):
    def __init__(self, config: ModelConfig, factory: LayerFactory, prefix: str) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        hidden, inter = config.hidden_size, config.intermediate_size
        self.router = factory.replicated(f"{prefix}.router", hidden, [config.num_experts])
        self.experts = factory.experts(f"{prefix}.experts", config.num_experts, hidden, inter)
        self.shared_expert = Llama4MLP(hidden, inter, factory, f"{prefix}.shared_expert")
        self.tp_size, self.tp_group = factory.tp_size, factory.tp_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, H]
        top_logits, top_ids = torch.topk(self.router(x), self.top_k, dim=-1)  # [T, k]
        scores = torch.sigmoid(top_logits.float()).to(x.dtype)
        # Llama 4 scales the expert's INPUT by the router score, not its output.
        if self.top_k == 1:  # Scout and Maverick: no copies to make, no choices to add up
            routed = self.experts(x * scores, top_ids.reshape(-1))
        else:
            routed_in = x.repeat_interleave(self.top_k, dim=0) * scores.reshape(-1, 1)  # [T * k, H]
            routed = self.experts(routed_in, top_ids.reshape(-1)).view(-1, self.top_k, x.shape[-1]).sum(dim=1)
        if self.tp_size > 1:  # each rank holds a slice of every expert, or whole experts (--ep-size)
            dist.all_reduce(routed, group=self.tp_group)
        return self.shared_expert(x) + routed


class Llama4DecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, spec: LayerSpec, factory: LayerFactory, backend: AttentionBackend, prefix: str
    ) -> None:
        super().__init__()
        self.self_attn = Llama4Attention(config, spec, factory, backend, f"{prefix}.self_attn")
        self.feed_forward: nn.Module = (
            Llama4MoE(config, factory, f"{prefix}.feed_forward")
            if spec.is_moe
            else Llama4MLP(config.hidden_size, config.intermediate_size_mlp, factory, f"{prefix}.feed_forward")
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: torch.Tensor,  # [T, head_dim // 2] complex rotation angles
        metadata: Any,
    ) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), positions, rope, metadata)
        x, h = add_rms_norm(x, attn, self.post_attention_layernorm)
        return x + self.feed_forward(h)


class Llama4TextModel(nn.Module):
    def __init__(self, config: ModelConfig, factory: LayerFactory, backend: AttentionBackend, prefix: str) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size,
            config.hidden_size,
            tp_rank=factory.tp_rank,
            tp_size=factory.tp_size,
            tp_group=factory.tp_group,
        )
        self.layers = nn.ModuleList(
            Llama4DecoderLayer(config, spec, factory, backend, f"{prefix}layers.{spec.index}") for spec in config.layers
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama4ForCausalLM(nn.Module):
    """Text decoder + LM head. `forward` returns final hidden states; `compute_logits` projects them."""

    def __init__(self, config: ModelConfig, factory: LayerFactory, backend: AttentionBackend, prefix: str = "") -> None:
        super().__init__()
        self.config = config
        self.model = Llama4TextModel(config, factory, backend, f"{prefix}model.")
        # Vocab-parallel: each rank computes its rows' logits, gathered in `compute_logits`.
        self.lm_head = factory.column(f"{prefix}lm_head", config.hidden_size, [config.vocab_size])
        self.tp_size, self.tp_group = factory.tp_size, factory.tp_group
        # Not a buffer: it is derived from the config, never loaded, and must survive meta-device init.
        self.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        if config.rope_freq_factors is not None:  # a GGUF file's Llama 3 scaling, as llama.cpp applies it
            self.inv_freq = self.inv_freq / torch.tensor(config.rope_freq_factors, dtype=torch.float32, device="cpu")
        # Speculative decoding (EAGLE-3) reads the outputs of these layers: each forward leaves them, in this
        # order, concatenated as `aux_hidden` [T, len(aux_layer_ids) * H]. Empty: nothing is kept.
        self.aux_layer_ids: tuple[int, ...] = ()
        self.aux_hidden: torch.Tensor | None = None

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T] absolute position of each token in its sequence
        metadata: Any,  # the attention backend's metadata of this step
        inputs_embeds: torch.Tensor | None = None,  # [T, H], replaces the embedding lookup (images)
    ) -> torch.Tensor:  # [T, H]
        fused = fused_step(self, input_ids, metadata) if inputs_embeds is None else None
        if fused is not None:  # a CPU decode step: the whole model as one op
            hidden, aux_hidden = fused(input_ids, positions)
            if self.aux_layer_ids:
                self.aux_hidden = aux_hidden
            return hidden
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        rope = rope_angles(positions, self.inv_freq)
        aux: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.model.layers):
            x = layer(x, positions, rope, metadata)
            if i in self.aux_layer_ids:
                aux[i] = x
        if self.aux_layer_ids:
            self.aux_hidden = torch.cat([aux[i] for i in self.aux_layer_ids], dim=-1)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, vocab]
        return gather_vocab(self.lm_head(hidden), self.tp_size, self.tp_group)
