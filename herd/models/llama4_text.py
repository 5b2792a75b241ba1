"""The Llama 4 text decoder over a flattened token batch.

Parameter names follow the Hugging Face checkpoint (without the `language_model.` prefix), so
loading is a name-for-name copy. Inputs are the new tokens of every sequence in the batch on
one axis (`input_ids: [T]`, `positions: [T]`); attention finds each sequence's context in the
paged KV cache through `AttentionMetadata`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from herd.config import LayerSpec, ModelConfig
from herd.layers.attention import AttentionBackend, AttentionMetadata, PagedKVStorage
from herd.layers.moe import grouped_experts, swiglu_expert
from herd.layers.norm import RMSNorm, rms_norm
from herd.layers.rotary import apply_rope, rope_angles, rope_inv_freq


class Llama4Attention(nn.Module):
    def __init__(self, config: ModelConfig, spec: LayerSpec, backend: AttentionBackend) -> None:
        super().__init__()
        self.spec = spec
        self.backend = backend
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        self.chunk_size = config.attention_chunk_size if spec.chunked else None
        self.eps = config.rms_norm_eps
        self.floor_scale, self.attn_scale = config.floor_scale, config.attn_scale
        bias = config.attention_bias
        hidden, q_dim, kv_dim = (
            config.hidden_size,
            config.num_heads * config.head_dim,
            config.num_kv_heads * config.head_dim,
        )
        self.q_dim, self.kv_dim = q_dim, kv_dim
        # q, k and v in one matmul; the loader fills the three row blocks from q_proj, k_proj, v_proj.
        self.qkv_proj = nn.Linear(hidden, q_dim + 2 * kv_dim, bias=bias)
        self.o_proj = nn.Linear(q_dim, hidden, bias=bias)

    def forward(
        self,
        x: torch.Tensor,  # [T, H]
        positions: torch.Tensor,  # [T]
        rope: torch.Tensor,  # [T, head_dim // 2] complex rotation angles
        meta: AttentionMetadata,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        # q and k side by side as heads: RoPE and qk-norm treat every head alike, so one call serves both.
        qk = qkv[:, : self.q_dim + self.kv_dim].unflatten(-1, (self.num_heads + self.num_kv_heads, self.head_dim))
        v = qkv[:, self.q_dim + self.kv_dim :].unflatten(-1, (self.num_kv_heads, self.head_dim))  # [T, n_kv, D]
        if self.spec.use_rope:
            qk = apply_rope(qk, rope)
        if self.spec.use_qk_norm:  # after RoPE, as the reference does
            qk = rms_norm(qk, self.eps)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)  # [T, n_heads, D], [T, n_kv_heads, D]
        if self.spec.temperature_tuning:
            # NoPE layers sharpen attention with the query's absolute position (arXiv 2501.19399).
            scale = torch.log1p(torch.floor((positions.float() + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
            q = (q * scale[:, None, None]).to(q.dtype)
        out = self.backend.forward(q, k, v, kv_cache, meta, self.chunk_size, self.head_dim**-0.5)
        return self.o_proj(out.flatten(-2))


class Llama4MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        # gate and up in one matmul; the loader fills the two row blocks from gate_proj and up_proj.
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Llama4Experts(nn.Module):
    """Routed experts stored fused, as HF checkpoints do."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * intermediate_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        return grouped_experts(
            x, expert_ids, lambda e, rows: swiglu_expert(rows, self.gate_up_proj[e], self.down_proj[e])
        )


class Llama4MoE(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Llama4Experts(config.num_experts, config.hidden_size, config.intermediate_size)
        self.shared_expert = Llama4MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, H]
        top_logits, top_ids = torch.topk(self.router(x), self.top_k, dim=-1)  # [T, k]
        scores = torch.sigmoid(top_logits.float()).to(x.dtype)
        # Llama 4 scales the expert's INPUT by the router score, not its output.
        routed_in = x.repeat_interleave(self.top_k, dim=0) * scores.reshape(-1, 1)  # [T * k, H]
        routed = self.experts(routed_in, top_ids.reshape(-1))
        out = self.shared_expert(x)
        return out + routed.view(-1, self.top_k, x.shape[-1]).sum(dim=1)


class Llama4DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, spec: LayerSpec, backend: AttentionBackend) -> None:
        super().__init__()
        self.self_attn = Llama4Attention(config, spec, backend)
        self.feed_forward: nn.Module = (
            Llama4MoE(config) if spec.is_moe else Llama4MLP(config.hidden_size, config.intermediate_size_mlp)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: torch.Tensor,  # [T, head_dim // 2] complex rotation angles
        meta: AttentionMetadata,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, rope, meta, kv_cache)
        return x + self.feed_forward(self.post_attention_layernorm(x))


class Llama4TextModel(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Llama4DecoderLayer(config, spec, backend) for spec in config.layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama4ForCausalLM(nn.Module):
    """Text decoder + LM head. `forward` returns final hidden states; `compute_logits` projects them."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.config = config
        self.model = Llama4TextModel(config, backend)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Not a buffer: it is derived from the config, never loaded, and must survive meta-device init.
        self.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T] absolute position of each token in its sequence
        meta: AttentionMetadata,
        kv_cache: PagedKVStorage,
        inputs_embeds: torch.Tensor | None = None,  # [T, H], replaces the embedding lookup (images)
    ) -> torch.Tensor:  # [T, H]
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        rope = rope_angles(positions, self.inv_freq)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, positions, rope, meta, kv_cache.layer(i))
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, vocab]
        return self.lm_head(hidden)
