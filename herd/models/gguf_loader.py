"""GGUF tensors under the Hugging Face names the loader knows, each dequantized to float32 when it is read.

llama.cpp's converter (`convert_hf_to_gguf.py`, class `Llama4Model`) renames the tensors, splits each fused
`experts.gate_up_proj [E, H, 2I]` into `ffn_gate_exps` and `ffn_up_exps` stored `[E, I, H]`, and transposes
`experts.down_proj [E, I, H]` into `ffn_down_exps [E, H, I]`: per expert, nn.Linear's `[out, in]`, so each
expert's slice goes to the loader as `experts.<e>.{gate,up,down}_proj.weight`. It does not permute q and k
for Llama 4 (`undo_permute = False`: llama.cpp's Llama 4 RoPE rotates adjacent pairs, as Meta's does), so
they load as stored. `rope_freqs.weight` is RoPE scaling, read into the config (herd.config.gguf).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from herd.config.gguf import ROPE_FREQS, dequantized, open_gguf

_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"^blk\.(?P<layer>\d+)\.(?P<name>[a-z_]+)\.weight$")
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate_inp": "feed_forward.router",
    "ffn_gate_shexp": "feed_forward.shared_expert.gate_proj",
    "ffn_up_shexp": "feed_forward.shared_expert.up_proj",
    "ffn_down_shexp": "feed_forward.shared_expert.down_proj",
    "ffn_gate": "feed_forward.gate_proj",  # the dense layers of an interleaved (Maverick) model
    "ffn_up": "feed_forward.up_proj",
    "ffn_down": "feed_forward.down_proj",
}
_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}


def gguf_tensors(path: str | Path) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(Hugging Face name, lazy float32 getter) for every weight of the GGUF model at `path`.

    A name this table does not know is passed through as the file spells it, so the loader reports it as
    unexpected.
    """
    for tensor in open_gguf(path, cached=False).tensors():
        if tensor.name == ROPE_FREQS:
            continue
        block = _BLOCK.match(tensor.name)
        if block is not None and block["name"] in _EXPERTS:
            prefix = f"model.layers.{block['layer']}.feed_forward.experts"
            for e in range(tensor.data.shape[0]):
                yield f"{prefix}.{e}.{_EXPERTS[block['name']]}.weight", _getter(tensor, e)
            continue
        if block is not None and block["name"] in _PER_LAYER:
            name = f"model.layers.{block['layer']}.{_PER_LAYER[block['name']]}.weight"
        else:
            name = _GLOBAL.get(tensor.name, tensor.name)
        yield name, _getter(tensor)


def _getter(tensor: object, index: int | None = None) -> Callable[[], torch.Tensor]:
    return lambda: torch.from_numpy(dequantized(tensor, index))
