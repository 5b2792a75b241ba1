"""--enable-torch-compile: the decode step compiles as one graph (fullgraph=True: no host sync, no Python
branching on tensor values) and gives the same tokens as eager, and as transformers."""

from __future__ import annotations

import torch

from herd.llm import LLM
from herd.sampling import SamplingParams

from checkpoints import CHUNK
from test_engine import hf_greedy

# Contexts 2 * CHUNK + 1 .. 3 * CHUNK - 1 while decoding: one chunk window and one block-table width, so
# the test pays for a single compilation.
PROMPT_LEN = 2 * CHUNK + 1
MAX_TOKENS = CHUNK - 1


def test_compiled_decode_matches_eager_and_transformers(scout_ckpt) -> None:
    path, ref = scout_ckpt
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, 256, (PROMPT_LEN,), generator=gen).tolist() for _ in range(2)]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    batch = [{"prompt_token_ids": p} for p in prompts]
    eager = LLM(str(path), dtype="float32").generate(batch, params, use_tqdm=False)

    llm = LLM(str(path), dtype="float32", enable_torch_compile=True)
    worker = llm.engine.core.workers[0]
    compiled, calls = worker.compiled_decode, []
    assert compiled is not None

    def counting(*args: object) -> torch.Tensor:
        calls.append(args)
        return compiled(*args)

    worker.compiled_decode = counting  # type: ignore[assignment]
    outputs = llm.generate(batch, params, use_tqdm=False)
    # Every one-token step: the decode steps, and the prompt's last token (a prefill step never crosses a
    # chunk boundary, so position 2 * CHUNK runs alone).
    assert len(calls) == MAX_TOKENS
    got = [o.outputs[0].token_ids for o in outputs]
    assert got == [o.outputs[0].token_ids for o in eager]
    assert got == [hf_greedy(ref, p, MAX_TOKENS) for p in prompts]
