"""--quantization w8a16: INT8 weights made at load give transformers' greedy tokens on the dequantized weights.

The reference quantizes the same tensors of the transformers model by the textbook rule (symmetric, one scale
per output channel: s = max|w| / 127, w' = round(w / s) * s), leaving the router, embeddings and norms alone,
then runs transformers' own generate on it.
"""

from __future__ import annotations

import copy

import pytest
import torch

from herd.llm import LLM
from herd.sampling import SamplingParams

from checkpoints import CHUNK
from test_engine import hf_greedy


def fake_quantize(weight: torch.Tensor, in_dim: int) -> torch.Tensor:
    scale = weight.abs().amax(dim=in_dim, keepdim=True) / 127.0
    return torch.round(weight / scale).clamp(-127, 127) * scale


def dequantized_reference(model: torch.nn.Module) -> torch.nn.Module:
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "router" in name or "embed_tokens" in name or name.endswith("norm.weight"):
                continue
            # Linear weights are [out, in]; fused experts [E, in, out] (gate_up_proj [E, H, 2I], down_proj [E, I, H]).
            p.copy_(fake_quantize(p, in_dim=1))
    return ref


@pytest.mark.parametrize("ckpt", ["scout_ckpt", "maverick_ckpt"])
def test_w8a16_greedy_tokens_match_transformers_on_dequantized(ckpt: str, request: pytest.FixtureRequest) -> None:
    path, model = request.getfixturevalue(ckpt)
    ref = dequantized_reference(model)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (2 * CHUNK + 3, 5)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    llm = LLM(str(path), dtype="float32", quantization="w8a16", chunked_prefill_size=7)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outputs]
    assert got == [hf_greedy(ref, p, 32) for p in prompts]
    # The quantization is not a no-op: the unquantized model continues differently somewhere.
    assert got != [hf_greedy(model, p, 32) for p in prompts]


def test_w8a16_stores_int8_weights(scout_ckpt) -> None:
    path, model = scout_ckpt
    worker = LLM(str(path), dtype="float32", quantization="w8a16").engine.core.workers[0]
    int8 = sum(b.numel() for name, b in worker.model.named_buffers() if b.dtype == torch.int8)
    quantized = sum(
        p.numel() for name, p in model.named_parameters() if "proj" in name or "lm_head" in name
    )  # attention, experts, shared expert, LM head
    assert int8 == quantized
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    assert worker.weight_bytes() < 0.5 * full  # fp32 -> int8 for all but the embeddings, router and norms
