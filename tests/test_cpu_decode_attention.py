"""herd's CPU decode attention kernel (herd/kernels/cpu/decode_attention.cpp) against PyTorch's masked SDPA over
the gathered blocks, the torch_native backend's path without the kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from herd.kernels.cpu import gemv_ops
from herd.layers.attention import (
    DraftTree,
    PagedAttention,
    get_attention_backend,
    torch_native,
)

from paged import shuffled_batch

pytestmark = pytest.mark.skipif(gemv_ops() is None, reason="herd's CPU kernels did not build here (or no AVX-512)")


def sdpa_over_gathered_blocks(q, k_cache, v_cache, table, offsets, lengths, scale):
    keys, values = k_cache[table].flatten(1, 2).float(), v_cache[table].flatten(1, 2).float()
    slots = torch.arange(keys.shape[1])[None, :]
    visible = (slots >= offsets[:, None]) & (slots < (offsets + lengths)[:, None])
    out = F.scaled_dot_product_attention(
        q.float()[:, :, None],
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=visible[:, None, None],
        scale=scale,
        enable_gqa=True,
    )
    return out[:, :, 0].to(q.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size"),
    [(8, 2, 32, 16), (40, 8, 128, 64), (6, 3, 24, 8), (4, 4, 16, 1)],  # head_dim 24: the scalar path
)
def test_decode_attention_matches_masked_sdpa(dtype, heads, kv_heads, head_dim, block_size) -> None:
    gen = torch.Generator().manual_seed(heads * 100 + head_dim + block_size)
    blocks, seqs, width = 40, 5, 6
    k_cache = torch.randn(blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    table = torch.randint(0, blocks, (seqs, width), generator=gen)
    offsets = torch.randint(0, block_size, (seqs,), generator=gen)
    lengths = torch.randint(1, width * block_size + 1, (seqs,), generator=gen).clamp(max=width * block_size - offsets)
    lengths[0] = 1  # a sequence that sees only itself
    q = torch.randn(seqs, heads, head_dim, generator=gen).to(dtype)
    scale = head_dim**-0.5

    got = torch.ops.herd_cpu.paged_decode_attention(q, k_cache, v_cache, table, offsets, lengths, scale)

    expected = sdpa_over_gathered_blocks(q, k_cache, v_cache, table, offsets, lengths, scale)
    assert got.dtype == dtype and got.shape == q.shape
    # Both accumulate in fp32 (in another order) and round once to the dtype.
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)


def test_decode_attention_reads_layer_views_of_a_pool() -> None:
    """The KV storage hands each layer a view of one pool tensor: strides past the first layer's."""
    pool = torch.randn(3, 2, 10, 4, 2, 32).bfloat16()  # [layers, K/V, blocks, block_size, kv_heads, head_dim]
    k_cache, v_cache = pool[2, 0], pool[2, 1]
    q = torch.randn(2, 4, 32).bfloat16()
    table, offsets, lengths = torch.tensor([[3, 7], [9, 1]]), torch.tensor([0, 2]), torch.tensor([6, 5])

    got = torch.ops.herd_cpu.paged_decode_attention(q, k_cache, v_cache, table, offsets, lengths, 0.2)

    expected = sdpa_over_gathered_blocks(q, k_cache, v_cache, table, offsets, lengths, 0.2)
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2)


def test_decode_attention_refuses_slots_outside_the_table() -> None:
    k_cache = torch.zeros(4, 8, 1, 16)
    q, table, offsets, lengths = torch.zeros(1, 2, 16), torch.tensor([[0, 1]]), torch.tensor([10]), torch.tensor([10])
    with pytest.raises(RuntimeError, match=r"sees slots \[10, 20\) of a table 16 slots wide"):
        torch.ops.herd_cpu.paged_decode_attention(q, k_cache, k_cache, table, offsets, lengths, 1.0)


def test_short_chunks_attend_as_decode_queries_as_spans_would(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch_native serves each token of a short chain (a verify step, a short prompt) as a decode query through the
    kernel, and a longer prefill too while the step's block table stays small: the same output as the causal,
    chunked span it replaces, in both pools, with local blocks released before the first query's window; a draft
    tree keeps its span."""
    chunk, block, kv_heads, heads, head_dim = 8, 4, 2, 4, 16
    # (context length after the step, new tokens): a decode, a chain across a chunk boundary inside a block, a fresh
    # prompt, a long prefill, a draft tree of 3 after its root.
    lens, trees = [(20, 1), (19, 6), (5, 5), (30, 20), (14, 4)], [None, None, None, None, DraftTree([-1, 0, -1])]
    gen = torch.Generator().manual_seed(0)
    batch, n_blocks, n_local, _ = shuffled_batch(lens, block, chunk, gen, torch.device("cpu"), trees)
    starts = batch.query_start_loc
    q = torch.randn(starts[-1], heads, head_dim, generator=gen)
    k = torch.randn(starts[-1], kv_heads, head_dim, generator=gen)
    v = torch.randn(starts[-1], kv_heads, head_dim, generator=gen)
    backend = get_attention_backend("torch_native")
    metadata = backend.build_metadata(batch)
    assert metadata.full.decode.rows.tolist() == list(range(0, 32)) and len(metadata.full.prefills) == 1  # the tree
    monkeypatch.setattr(torch_native, "DECODE_TABLE_MAX", 32 * 7)  # the long prefill's 20 rows make 32 rows x 8 blocks
    metadata = backend.build_metadata(batch)
    assert metadata.full.decode.rows.tolist() == list(range(0, 12)) and len(metadata.full.prefills) == 2
    monkeypatch.undo()
    for chunked, pool_blocks in ((False, n_blocks), (True, n_local)):
        cache = torch.randn(2, pool_blocks, block, kv_heads, head_dim, generator=gen)
        outs = []
        # As decode queries through the kernel, as spans, and without the kernel (spans, and the one-token decodes
        # through SDPA under the mask the kernel does without).
        for few, table, kernel in (
            (torch_native.DECODE_QUERIES_MAX, torch_native.DECODE_TABLE_MAX, True),
            (torch_native.DECODE_QUERIES_MAX, 0, True),
            (1, 0, True),
            (torch_native.DECODE_QUERIES_MAX, torch_native.DECODE_TABLE_MAX, False),
        ):
            monkeypatch.setattr(torch_native, "DECODE_QUERIES_MAX", few)
            monkeypatch.setattr(torch_native, "DECODE_TABLE_MAX", table)
            monkeypatch.setattr(torch_native, "cpu_kernels_enabled", lambda kernel=kernel: kernel)
            layer = PagedAttention(0, head_dim, head_dim**-0.5, chunk if chunked else None, backend)
            kv = cache.clone()
            layer.kv_cache = (kv[0], kv[1])
            metadata = backend.build_metadata(batch)
            assert (metadata.pool(chunked).decode.valid is None) == kernel
            outs.append(layer(q, k, v, metadata))
        monkeypatch.undo()
        for out in outs[1:]:
            torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5, msg=f"chunked={chunked}")
