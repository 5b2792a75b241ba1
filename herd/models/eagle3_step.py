"""The EAGLE-3 draft layer for drafting: the same network as `Eagle3DraftModel.layer`, with as few ops as it takes.

At batch 1 on a CPU a draft step is a few dozen tiny ops, so its cost is their count, not their flops. This is
the draft's step written for that: q/k/v one matmul (the attention scale folded into q's rows), gate/up one
matmul, RoPE from a cached table, attention as two batched matmuls over the draft's KV cache held head-major
([n_kv, positions, D], so the past keys are a view, never a copy), and no module calls. The training and tree
paths keep the module form; both compute the same function (tests/test_eagle3_draft.py checks the chains).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from herd.kernels.cpu import enabled as cpu_kernels_enabled
from herd.layers.quantization.cpu_gemv import bf16_linear
from herd.layers.quantization.unquantized import pack, packed_linear
from herd.models.eagle3_model import Eagle3DraftModel

# Up to this size (a small vocabulary: the demo draft's is 4 MiB) the embedding half of q/k/v is precomputed per
# token; a Llama 4 vocabulary of 202k would need gigabytes, so there each step computes its row.
TOKEN_TABLE_BYTES = 64 * 2**20


class DraftStep:
    """packed: the matmul weights in bf16 (CPU only; activations stay in the model's dtype), for herd's GEMV kernel
    or, where it does not run, in oneDNN's packed layout. In a live step the draft's weights come from memory
    cold, after the target's forward: half the bytes pays more than bf16 rounding costs (demo draft: 1.20x vs
    1.11x decode speedup, same accept length)."""

    def __init__(self, model: Eagle3DraftModel, packed: bool = False) -> None:
        cfg, m = model.config, model.midlayer
        attn = m.self_attn
        self.num_heads, self.num_kv, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.hidden, self.eps = cfg.hidden_size, cfg.rms_norm_eps
        h, scale = cfg.hidden_size, self.head_dim**-0.5
        self.dtype, self.device = attn.o_proj.weight.dtype, attn.o_proj.weight.device
        # Each RMS norm's weight folded into the columns of the matmul that reads it, and the attention scale into
        # q's rows (RoPE is linear): the same function, fewer ops.
        qkv = torch.cat([attn.q_proj.weight * scale, attn.k_proj.weight, attn.v_proj.weight])
        self.w_qkv_hidden = (qkv[:, h:] * m.hidden_norm.weight).contiguous()
        self.w_qkv_embed = (qkv[:, :h] * m.input_layernorm.weight).contiguous()
        self.embedding = model.embed_tokens.weight
        self.qkv_of_token: torch.Tensor | None = None
        if self.embedding.shape[0] * qkv.shape[0] * qkv.element_size() <= TOKEN_TABLE_BYTES:
            # The embedding half of q/k/v for every token at once: a draft step looks its row up instead.
            embed = F.rms_norm(self.embedding.to(self.dtype), (h,), None, self.eps)
            self.qkv_of_token = F.linear(embed, self.w_qkv_embed)  # [vocab, (n_heads + 2 n_kv) * D]
            del self.w_qkv_embed
        self.w_o = attn.o_proj.weight
        self.w_gate_up = torch.cat([m.mlp.gate_proj.weight, m.mlp.up_proj.weight]) * m.post_attention_layernorm.weight
        self.w_down = m.mlp.down_proj.weight
        self.w_fc, self.w_head = model.fc.weight, (model.lm_head.weight * model.norm.weight).contiguous()
        self.linear, self.packed = F.linear, packed
        self.cpu_kernels = self.device.type == "cpu" and cpu_kernels_enabled()
        if packed:
            # herd's kernel where it runs: a draft step's rows are few, and oneDNN's call costs 15-20 us whatever
            # the size, more than the kernel takes for the demo draft's matmuls.
            for name in ("w_qkv_hidden", "w_qkv_embed", "w_o", "w_gate_up", "w_down", "w_fc", "w_head"):
                if hasattr(self, name):
                    weight = getattr(self, name).to(torch.bfloat16)
                    setattr(self, name, weight.contiguous() if self.cpu_kernels else pack(weight))
            self.linear = _kernel_linear if self.cpu_kernels else _bf16_linear
        self.to_target = model.draft_to_target.tolist()
        self._model = model
        self._cos = self._sin = torch.empty((0, 1, self.head_dim), dtype=self.dtype, device=self.device)
        self._masks: dict[int, torch.Tensor] = {}

    def fc(self, aux: torch.Tensor) -> torch.Tensor:  # [T, 3 * target H] -> [T, H]
        if self.packed:  # the target's bf16 states straight in, no round trip through fp32
            return self.linear(aux.to(torch.bfloat16), self.w_fc).to(self.dtype)
        return F.linear(aux.to(self.dtype), self.w_fc)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """Weightless RMS norm (the weights are folded into the matmuls): herd's CPU op where it runs, one op for
        PyTorch's several (17 against 6 us on a draft row)."""
        if self.cpu_kernels:
            return torch.ops.herd_cpu.rms_norm(x, None, self.eps)
        return F.rms_norm(x, (self.hidden,), None, self.eps)

    def rope(self, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [n, 1, D] of positions start .. start + n - 1 (x * cos + swap_halves(x) * sin)."""
        if start + n > self._cos.shape[0]:
            size = max(start + n, 2 * self._cos.shape[0], 256)
            cos, sin = self._model.rope(torch.arange(size, device=self.device))
            half = self.head_dim // 2
            sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
            self._cos, self._sin = cos.to(self.dtype)[:, None], sin.to(self.dtype)[:, None]
        return self._cos[start : start + n], self._sin[start : start + n]

    def __call__(
        self,
        token_ids: torch.Tensor,  # [T] the token at each position + 1
        hidden: torch.Tensor,  # [T, H] fc(target features) or the draft's previous output
        start: int,  # position of the first row; rows are consecutive positions
        k_cache: torch.Tensor,  # [n_kv, capacity, D]: positions < start hold the context; written at start ..
        v_cache: torch.Tensor,
    ) -> torch.Tensor:  # [T, H] the pre-norm outputs
        n, d, kv, h = token_ids.shape[0], self.head_dim, self.num_kv, self.num_heads
        norm = self.norm(hidden)
        qkv = self.linear(norm, self.w_qkv_hidden).add_(self._qkv_of(token_ids))
        qk, v = qkv.view(n, h + 2 * kv, d).split([h + kv, kv], dim=1)
        cos, sin = self.rope(start, n)
        qk = qk * cos + qk.roll(d // 2, dims=-1) * sin  # rotate-half RoPE on q and k heads at once
        end = start + n
        k_cache[:, start:end] = qk[:, h:].transpose(0, 1)
        v_cache[:, start:end] = v.transpose(0, 1)
        mask = None if n == 1 else self._future(n)  # the new rows see every earlier position and, causally, each other
        return self._attend(hidden, qk[:, :h], k_cache, v_cache, end, mask, start)

    def tree(
        self,
        token_ids: torch.Tensor,  # [n] one tree node's token per row
        hidden: torch.Tensor,  # [n, H] each node's parent's output
        position: int,  # every row's position (the nodes of one depth)
        slot: int,  # their K/V go to cache slots slot .. slot + n - 1
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        visible: torch.Tensor,  # bool [n, slot + n]: the slots each row sees (context, ancestors, itself)
    ) -> torch.Tensor:  # [n, H] the pre-norm outputs
        """One depth of a draft tree, its frontier as a batch: same function as `__call__` on each root-to-node path."""
        n, d, kv, h = token_ids.shape[0], self.head_dim, self.num_kv, self.num_heads
        norm = self.norm(hidden)
        qkv = self.linear(norm, self.w_qkv_hidden).add_(self._qkv_of(token_ids))
        qk, v = qkv.view(n, h + 2 * kv, d).split([h + kv, kv], dim=1)
        cos, sin = self.rope(position, 1)
        qk = qk * cos + qk.roll(d // 2, dims=-1) * sin
        end = slot + n
        k_cache[:, slot:end] = qk[:, h:].transpose(0, 1)
        v_cache[:, slot:end] = v.transpose(0, 1)
        hidden_mask = ~visible.repeat_interleave(h // kv, dim=0)  # [n * group, end]: True where hidden
        return self._attend(hidden, qk[:, :h], k_cache, v_cache, end, hidden_mask, 0)

    def _attend(
        self,
        hidden: torch.Tensor,  # [n, H] the rows' inputs (the residual)
        q: torch.Tensor,  # [n, n_heads, D] rotated and scaled
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        end: int,  # the rows attend over cache slots < end
        mask: torch.Tensor | None,  # bool [n * group, end - mask_from]: True where a row must not look
        mask_from: int,
    ) -> torch.Tensor:
        n, d, kv, h = q.shape[0], self.head_dim, self.num_kv, self.num_heads
        # Grouped-query attention as one batched matmul per KV head: q [n_kv, n * group, D].
        group = h // kv
        grouped = q[0].view(kv, group, d) if n == 1 else q.reshape(n, kv, group, d).transpose(0, 1).flatten(1, 2)
        scores = torch.bmm(grouped, k_cache[:, :end].transpose(1, 2))  # [n_kv, n * group, end]
        if mask is not None:
            scores[:, :, mask_from:].masked_fill_(mask, float("-inf"))
        out = torch.bmm(scores.softmax(-1), v_cache[:, :end])  # [n_kv, n * group, D]
        out = out.view(1, h * d) if n == 1 else out.view(kv, n, group * d).transpose(0, 1).reshape(n, h * d)
        mid = hidden + self.linear(out, self.w_o)
        gate, up = self.linear(self.norm(mid), self.w_gate_up).chunk(2, dim=-1)
        return mid + self.linear(F.silu(gate) * up, self.w_down)

    def _qkv_of(self, token_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, (n_heads + 2 n_kv) * D]
        if self.qkv_of_token is not None:
            return self.qkv_of_token[token_ids]
        embed = F.embedding(token_ids, self.embedding).to(self.dtype)
        return self.linear(self.norm(embed), self.w_qkv_embed)

    def _future(self, n: int) -> torch.Tensor:
        """bool [n * group, n]: query row r (token r // group) must not see new token j > r // group."""
        mask = self._masks.get(n)
        if mask is None:
            group = self.num_heads // self.num_kv
            mask = torch.ones(n, n, dtype=torch.bool, device=self.device).triu(1).repeat_interleave(group, dim=0)
            self._masks[n] = mask
        return mask

    def logprobs(self, out: torch.Tensor) -> torch.Tensor:
        """[n, draft vocab] log-probabilities after pre-norm outputs [n, H]."""
        logits = self.linear(self.norm(out), self.w_head)
        return torch.log_softmax(logits.float(), dim=-1)

    def head(self, out: torch.Tensor) -> int:
        """The greedy draft token (a target id) after a pre-norm output [H]: the argmax over the draft vocabulary."""
        return self.to_target[int(self.linear(self.norm(out), self.w_head).argmax())]


def _bf16_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return packed_linear(x.to(torch.bfloat16), packed).to(x.dtype)


def _kernel_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return bf16_linear(x.to(torch.bfloat16), weight).to(x.dtype)
