"""herd's Llama 4 text model computes what transformers computes, on the same checkpoint."""

from __future__ import annotations

import pytest
import torch

from herd.models.loader import load_model

from checkpoints import CHUNK, SCOUT_LIKE, make_text_checkpoint, reference_logits
from paged import PagedRunner

# Shorter than, equal to, and several times longer than the chunk.
PROMPT_LENS = [5, CHUNK, 3 * CHUNK + 5]
ATOL = 1e-4


def prompt(length: int, seed: int, vocab: int = 256) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=gen).tolist()


@pytest.fixture(params=["scout_ckpt", "maverick_ckpt", "multimodal_ckpt"])
def ckpt(request: pytest.FixtureRequest):
    return request.getfixturevalue(request.param)


def test_logits_of_order_one(scout_ckpt) -> None:
    """Guards the fixtures: near-zero logits would let any implementation "match"."""
    _, ref = scout_ckpt
    logits = reference_logits(ref, prompt(16, 0))
    assert logits.std() > 0.5


def test_full_sequence_logits_match_transformers(ckpt) -> None:
    path, ref = ckpt
    model = load_model(path, dtype="float32")
    prompts = [prompt(n, seed=n) for n in PROMPT_LENS]
    runner = PagedRunner(model, max_seqs=len(prompts), max_len=max(PROMPT_LENS))
    # All prompts in one flattened batch, each against its own single-sequence reference.
    logits = runner.step(list(enumerate(prompts)))
    offset = 0
    for ids in prompts:
        expected = reference_logits(ref, ids)
        got = logits[offset : offset + len(ids)]
        offset += len(ids)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("block_size", [4, 3])
def test_incremental_decoding_matches_full_forward(ckpt, block_size: int) -> None:
    path, ref = ckpt
    model = load_model(path, dtype="float32")
    ids = prompt(4 * CHUNK + 3, seed=7)
    expected = reference_logits(ref, ids)
    runner = PagedRunner(model, max_seqs=2, max_len=len(ids), block_size=block_size)
    # Sequence 0: prefill 5 tokens, then one token at a time across four chunk boundaries.
    # Sequence 1: chunked prefill in pieces of 3 that straddle chunk boundaries, decoded alongside.
    got0 = [runner.step([(0, ids[:5])])]
    got1 = []
    pos0, pos1 = 5, 0
    while pos0 < len(ids) or pos1 < len(ids):
        batch = []
        if pos0 < len(ids):
            batch.append((0, ids[pos0 : pos0 + 1]))
        if pos1 < len(ids):
            batch.append((1, ids[pos1 : pos1 + 3]))
        out = runner.step(batch)
        if pos0 < len(ids):
            got0.append(out[:1])
            out = out[1:]
            pos0 += 1
        if pos1 < len(ids):
            got1.append(out)
            pos1 += 3
    torch.testing.assert_close(torch.cat(got0), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.cat(got1), expected, atol=ATOL, rtol=0)


def test_temperature_tuning_is_exercised(scout_ckpt) -> None:
    """The fixture's floor_scale is small enough that turning tuning off changes the logits."""
    _, ref = scout_ckpt
    ids = prompt(3 * CHUNK, seed=3)
    with_tuning = reference_logits(ref, ids)
    attns = [layer.self_attn for layer in ref.model.layers]
    try:
        for attn in attns:
            attn.attn_temperature_tuning = False
        without = reference_logits(ref, ids)
    finally:
        for attn in attns:
            attn.attn_temperature_tuning = True
    assert (with_tuning - without).abs().max() > 1e-2


def test_routing_differs_across_tokens(scout_ckpt) -> None:
    path, _ = scout_ckpt
    model = load_model(path, dtype="float32")
    x = model.model.embed_tokens(torch.tensor(prompt(64, seed=5)))
    chosen = model.model.layers[0].feed_forward.router(x).argmax(-1)
    assert len(chosen.unique()) == model.config.num_experts


def test_bfloat16_close_to_float32(scout_ckpt) -> None:
    path, ref = scout_ckpt
    ids = prompt(2 * CHUNK, seed=11)
    runner = PagedRunner(load_model(path), max_seqs=1, max_len=len(ids))
    assert next(runner.model.parameters()).dtype == torch.bfloat16
    got = runner.step([(0, ids)])
    expected = reference_logits(ref, ids)
    # bf16 keeps ~3 significant digits; the argmax should mostly agree.
    agree = (got.argmax(-1) == expected.argmax(-1)).float().mean()
    assert agree >= 0.75


def test_batched_decode_of_unequal_contexts(ckpt) -> None:
    """Several sequences decoding in one step (one padded attention batch) at different lengths."""
    path, ref = ckpt
    model = load_model(path, dtype="float32")
    seqs = [prompt(n, seed=20 + n) for n in (13, CHUNK + 12, 3 * CHUNK + 7)]
    runner = PagedRunner(model, max_seqs=3, max_len=3 * CHUNK + 7)
    runner.step([(0, seqs[0][:-10])])
    runner.step([(1, seqs[1][:-10]), (2, seqs[2][:-10])])
    got = [[] for _ in seqs]
    for t in range(10, 0, -1):
        out = runner.step([(i, [s[-t]]) for i, s in enumerate(seqs)])
        for i in range(3):
            got[i].append(out[i])
    for i, ids in enumerate(seqs):
        torch.testing.assert_close(torch.stack(got[i]), reference_logits(ref, ids)[-10:], atol=ATOL, rtol=0)


def test_two_experts_per_token_match_transformers(tmp_path) -> None:
    """Scout and Maverick route each token to one expert (herd's short path); the general path adds up several."""
    ref = make_text_checkpoint(tmp_path, {**SCOUT_LIKE, "num_experts_per_tok": 2}, seed=3)
    model = load_model(tmp_path, dtype="float32")
    ids = prompt(2 * CHUNK + 3, seed=7)
    logits = PagedRunner(model, max_seqs=1, max_len=len(ids)).step([(0, ids)])
    torch.testing.assert_close(logits, reference_logits(ref, ids), atol=ATOL, rtol=0)
