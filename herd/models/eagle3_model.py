"""The EAGLE-3 draft network: `fc` over three target hidden states, one Llama decoder layer, a head.

Module and tensor names are those of the published checkpoints (SGLang's
python/sglang/srt/models/llama_eagle3.py, SpecForge's specforge/modeling/draft/llama3_eagle.py):
`fc`, `midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}`, `midlayer.self_attn.{q,k,v,o}_proj`,
`midlayer.mlp.{gate,up,down}_proj`, `norm`, `lm_head`, and `embed_tokens` when the draft has its own.

One step at position p reads two things: the embedding of the token at p + 1, and a hidden state for p,
either `fc(target layers' outputs at p)` (positions the target has verified) or the draft's own
pre-norm output at p - 1 (positions it is drafting). q/k/v see both, concatenated ([2H] -> heads):

    x = [input_layernorm(embed) ; hidden_norm(hidden)]
    h = hidden + o_proj(attention(x))
    out = h + mlp(post_attention_layernorm(h))        # fed back as the next step's hidden
    logits = lm_head(norm(out))                       # over the draft vocabulary

Attention is plain causal with rotate-half RoPE (the draft is a Llama, not a Llama 4, layer). Tensors carry a
leading batch axis so the trainer runs the same code; the drafter runs batch 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from herd.layers.norm import RMSNorm
from herd.layers.rotary import rope_inv_freq
from herd.models.eagle3_config import Eagle3Config


class Eagle3Attention(nn.Module):
    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        d, h = cfg.head_dim, cfg.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_proj = nn.Linear(2 * h, cfg.num_heads * d, bias=False)
        self.k_proj = nn.Linear(2 * h, cfg.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(2 * h, cfg.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)

    def qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, T, 2H] -> q [B, T, n_heads, D], k and v [B, T, n_kv, D], RoPE applied to q and k."""
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q: [B, T, n_heads, D] over k, v: [B, S, n_kv, D]; mask: bool [T, S] or [B, T, S], True = visible."""
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask.unsqueeze(-3),  # one mask for every head
            enable_gqa=True,
        )
        return self.o_proj(out.transpose(1, 2).flatten(-2))


class Eagle3MLP(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Eagle3MidLayer(nn.Module):
    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Eagle3Attention(cfg)
        self.mlp = Eagle3MLP(cfg.hidden_size, cfg.intermediate_size)


class Eagle3DraftModel(nn.Module):
    """The draft's weights and its one-layer forward; KV bookkeeping lives in `Eagle3Drafter`."""

    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.fc = nn.Linear(3 * cfg.target_hidden_size, cfg.hidden_size, bias=False)
        self.midlayer = Eagle3MidLayer(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)
        # d2t as published stores offsets (target id = draft id + d2t[draft id]); this holds the target ids.
        self.register_buffer("draft_to_target", torch.arange(cfg.draft_vocab_size), persistent=False)
        # Not a buffer: derived from the config, never loaded, and kept in float32 whatever the weights' dtype.
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [..., T, D] (float32) for rotate-half RoPE at `positions` [..., T]."""
        freqs = positions.float()[..., None] * self.inv_freq.to(positions.device)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def layer(
        self,
        embeds: torch.Tensor,  # [B, T, H] embeddings of the tokens at positions + 1
        hidden: torch.Tensor,  # [B, T, H] fc(target features) or the draft's previous output
        positions: torch.Tensor,  # [B, T] or [T]
        past_k: torch.Tensor,  # [B, S, n_kv, D] keys before these tokens (S may be 0)
        past_v: torch.Tensor,
        mask: torch.Tensor,  # bool [T, S + T] or [B, T, S + T]: which keys each new token sees
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decoder step: (pre-norm output [B, T, H], new keys, new values [B, T, n_kv, D])."""
        m = self.midlayer
        x = torch.cat([m.input_layernorm(embeds), m.hidden_norm(hidden)], dim=-1)
        cos, sin = self.rope(positions)
        q, k, v = m.self_attn.qkv(x, cos, sin)
        attn = m.self_attn.attend(q, torch.cat([past_k, k], dim=1), torch.cat([past_v, v], dim=1), mask)
        h = hidden + attn
        return h + m.mlp(m.post_attention_layernorm(h)), k, v

    def logits(self, out: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., draft_vocab]
        return self.lm_head(self.norm(out))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (Llama / NeoX layout) on x: [B, T, heads, D], in float32."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)).type_as(x)


def causal_mask(past: int, new: int, device: torch.device | None = None) -> torch.Tensor:
    """bool [new, past + new]: every new token sees all past keys and the new ones up to itself."""
    cols = torch.arange(past + new, device=device)
    rows = torch.arange(new, device=device)[:, None] + past
    return cols[None, :] <= rows
