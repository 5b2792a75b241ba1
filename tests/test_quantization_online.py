"""--quantization fp8 | w4a16: weights quantized at load give transformers' greedy tokens on the dequantized weights.

The reference applies the textbook rules to the same tensors of the transformers model (every linear weight
and expert but the router; embeddings and norms as stored):
- fp8: one scale per output channel, s = max|w| / 448, w' = fp8(w / s) * s;
- w4a16: one scale per group of 128 inputs (64 or 32 on inputs narrower than 128), s = max|w| / 7.5,
  w' = clamp(round(w / s), -8, 7) * s.
"""

from __future__ import annotations

import copy

import pytest
import torch

from herd.llm import LLM
from herd.sampling import SamplingParams

from checkpoints import CHUNK
from test_engine import hf_greedy


def fp8_rows(w: torch.Tensor) -> torch.Tensor:  # w [out, in]
    s = w.abs().amax(dim=1, keepdim=True) / 448.0
    return (w / s).to(torch.float8_e4m3fn).float() * s


def int4_groups(w: torch.Tensor) -> torch.Tensor:  # w [out, in]
    group = next(g for g in (128, 64, 32) if w.shape[1] % g == 0)
    grouped = w.reshape(w.shape[0], -1, group)
    s = grouped.abs().amax(dim=2, keepdim=True) / 7.5
    return (torch.round(grouped / s).clamp(-8, 7) * s).reshape(w.shape)


RULES = {"fp8": fp8_rows, "w4a16": int4_groups}


def dequantized_reference(model: torch.nn.Module, rule) -> torch.nn.Module:
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "router" in name or "embed_tokens" in name or name.endswith("norm.weight"):
                continue
            if p.dim() == 3:  # fused experts [E, in, out]
                p.copy_(torch.stack([rule(p[e].t()).t() for e in range(p.shape[0])]))
            else:
                p.copy_(rule(p))
    return ref


@pytest.mark.parametrize("quantization", ["fp8", "w4a16"])
def test_greedy_tokens_match_transformers_on_dequantized(quantization: str, maverick_ckpt) -> None:
    path, model = maverick_ckpt
    ref = dequantized_reference(model, RULES[quantization])
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (2 * CHUNK + 3, 5)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    llm = LLM(str(path), dtype="float32", quantization=quantization, chunked_prefill_size=7)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outputs]
    assert got == [hf_greedy(ref, p, 32) for p in prompts]
    if quantization == "w4a16":  # INT4 is coarse enough that the unquantized model continues differently
        assert got != [hf_greedy(model, p, 32) for p in prompts]


def test_weight_bytes_shrink(scout_ckpt) -> None:
    path, model = scout_ckpt
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    sizes = {}
    for quantization in ("fp8", "w4a16"):
        worker = LLM(str(path), dtype="float32", quantization=quantization).engine.core.workers[0]
        sizes[quantization] = worker.weight_bytes()
    assert sizes["w4a16"] < sizes["fp8"] < 0.5 * full
