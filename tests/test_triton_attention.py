"""The `triton` attention backend against the `torch_native` reference, under Triton's interpreter on the CPU
(conftest sets TRITON_INTERPRET=1 when no GPU is present; on a GPU the same tests run the compiled kernels).

Each case is one step of a batch over shuffled paged blocks: ragged context lengths, new tokens that cross
chunk boundaries inside a block and inside the step, GQA ratios 1/4/5, block sizes 16 and 64, queries whose
local window is empty (first position of a chunk) or full (last position), and local blocks released
before the window poisoned with NaN so that a kernel reading them fails.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from herd.layers.attention import PagedAttention, get_attention_backend

from paged import shuffled_batch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CHUNK = 8

# (context length after the step, new tokens) per sequence.
DECODE = [(1, 1), (8, 1), (9, 1), (16, 1), (23, 1), (41, 1)]  # windows: 1, full, empty, full, 7, empty
EXTEND = [(5, 5), (30, 13), (20, 1), (17, 3), (48, 16)]  # fresh prompt, 3 boundaries, a decode, 1 boundary


def _run(lens: list[tuple[int, int]], group: int, block: int, head_dim: int = 16, kv_heads: int = 2) -> None:
    gen = torch.Generator().manual_seed(group * 100 + block + len(lens))
    heads = group * kv_heads
    batch, n_full, n_local, released = shuffled_batch(lens, block, CHUNK, gen, DEVICE)
    tokens = batch.query_start_loc[-1]
    q = torch.randn(tokens, heads, head_dim, generator=gen).to(DEVICE)
    k = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(DEVICE)
    v = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(DEVICE)
    reference = get_attention_backend("torch_native")
    triton_backend = get_attention_backend("triton")
    triton_backend.split_tokens = 8  # several splits even on these short contexts
    for chunked, n_blocks in ((False, n_full), (True, n_local)):
        cache = torch.randn(2, n_blocks, block, kv_heads, head_dim, generator=gen).to(DEVICE)
        if chunked:
            cache[:, released] = float("nan")
        outs, caches = [], []
        for backend in (reference, triton_backend):
            layer = PagedAttention(0, head_dim, head_dim**-0.5, CHUNK if chunked else None, backend)
            kv = cache.clone()
            layer.kv_cache = (kv[0], kv[1])
            outs.append(layer(q, k, v, backend.build_metadata(batch)))
            caches.append(kv)
        torch.testing.assert_close(outs[1], outs[0], atol=2e-5, rtol=2e-5, msg=f"chunked={chunked}")
        torch.testing.assert_close(caches[1], caches[0], equal_nan=True)


@pytest.mark.parametrize(("group", "block"), [(1, 16), (4, 64), (5, 16)])
def test_decode_matches_torch_native(group: int, block: int) -> None:
    _run(DECODE, group, block)


@pytest.mark.parametrize(("group", "block"), [(1, 64), (4, 16), (5, 64)])
def test_extend_matches_torch_native(group: int, block: int) -> None:
    _run(EXTEND, group, block)


def test_head_dim_below_tile_and_one_kv_head() -> None:
    _run([(12, 12), (10, 1)], group=5, block=16, head_dim=8, kv_heads=1)
    _run([(12, 1), (10, 1)], group=5, block=16, head_dim=8, kv_heads=1)


def test_long_decode_uses_several_splits() -> None:
    backend = get_attention_backend("triton")
    assert backend.splits_for(1) == 1
    assert backend.splits_for(backend.split_tokens * 3) == 3
    assert backend.splits_for(10**9) == backend.max_splits


def test_greedy_tokens_match_transformers_through_two_chunk_boundaries(scout_ckpt) -> None:
    """The whole engine on the triton backend: ragged prompts prefilled in pieces of 5 tokens (extend over a
    cached prefix, a chunk boundary inside a step), then decode past positions 8 and 16 (two chunk boundaries
    of the tiny checkpoint) in one batch."""
    from herd.llm import LLM
    from herd.sampling import SamplingParams

    from checkpoints import CHUNK as MODEL_CHUNK
    from test_engine import hf_greedy

    path, ref = scout_ckpt
    assert MODEL_CHUNK == CHUNK
    gen = torch.Generator().manual_seed(19)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (6, 11)]
    max_tokens = 2 * CHUNK + 1 - 6
    llm = LLM(str(path), dtype="float32", attention_backend="triton", chunked_prefill_size=5, page_size=4)
    assert llm.engine.core.workers[0].backend.name == "triton"
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [hf_greedy(ref, p, max_tokens) for p in prompts]


def test_triton_is_the_default_on_cuda_only() -> None:
    from herd.config.engine import default_attention_backend

    assert default_attention_backend("cuda") == "triton"
    assert default_attention_backend("cpu") == "torch_native"
