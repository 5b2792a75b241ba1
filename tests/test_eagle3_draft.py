"""EAGLE-3 drafts in the published layout: config, loading, fit checks, and drafting against a recomputation.

The reference recomputes the whole draft sequence from scratch (no KV cache) with transformers' Llama RoPE
and RMSNorm, reading the draft's config.json as transformers' own LlamaConfig: an independent check of the
layer's wiring, the rope settings, d2t and the drafter's cache bookkeeping.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from herd.config import ModelConfig
from herd.kernels.cpu import gemv_ops
from herd.layers.quantization.unquantized import cpu_packing_available
from herd.models import eagle3_step
from herd.models.llama4_eagle3 import Eagle3Config, Eagle3Drafter, load_eagle3_draft

from checkpoints import SCOUT_LIKE
from eagle3_fixtures import draft_tensors, write_eagle3_draft

TARGET = SCOUT_LIKE  # hidden 64, vocabulary 256, 4 layers

# The shape of a published Llama 4 draft config (SpecForge's configs/llama4-scout-17B-16E-eagle3.json), with
# NVIDIA's eagle_config block as its Maverick draft carries.
PUBLISHED = {
    "architectures": ["LlamaForCausalLMEagle3"],
    "hidden_act": "silu",
    "hidden_size": 5120,
    "initializer_range": 0.02,
    "intermediate_size": 32768,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "num_hidden_layers": 1,
    "pad_token_id": 0,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 202048,
    "draft_vocab_size": 32000,
}


def test_published_config_parses(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED))
    cfg = Eagle3Config.from_hf(tmp_path)
    assert (cfg.hidden_size, cfg.target_hidden_size, cfg.vocab_size, cfg.draft_vocab_size) == (
        5120,
        5120,
        202048,
        32000,
    )
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size) == (40, 8, 128, 32768)
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.rms_norm_eps) == (10000.0, None, 1e-5)
    assert cfg.target_layer_ids is None
    # SGLang's default for Maverick's 48 layers: inputs of layers 2, 24, 45 = outputs of layers 1, 23, 44.
    assert cfg.resolve_layer_ids(48) == (1, 23, 44)

    nvidia = {
        **PUBLISHED,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 23, 44], "use_aux_hidden_state": True},
    }
    (tmp_path / "config.json").write_text(json.dumps(nvidia))
    assert Eagle3Config.from_hf(tmp_path).target_layer_ids == (1, 23, 44)


def test_loads_with_target_embedding(tmp_path: Path) -> None:
    path = write_eagle3_draft(tmp_path, TARGET, draft_vocab_size=100)
    embedding = torch.randn(TARGET["vocab_size"], TARGET["hidden_size"])
    drafter = load_eagle3_draft(path, TARGET, torch.float32, "cpu", target_embedding=embedding)
    assert drafter.target_layer_ids == (1, 1, 0)  # SGLang's default, clamped into a 4-layer target
    assert drafter.model.embed_tokens.weight.data_ptr() == embedding.data_ptr()  # shared, not copied
    hot = set(drafter.model.draft_to_target.tolist())
    assert len(hot) == 100 and hot <= set(range(TARGET["vocab_size"]))

    with pytest.raises(ValueError, match="target_embedding"):
        load_eagle3_draft(path, TARGET, torch.float32, "cpu")


def test_loads_against_herd_and_transformers_configs(tmp_path: Path) -> None:
    from checkpoints import make_text_checkpoint

    target = make_text_checkpoint(tmp_path / "target", TARGET)
    path = write_eagle3_draft(tmp_path / "draft", TARGET, with_embedding=True)
    for config in (ModelConfig.from_hf(tmp_path / "target"), target.config):
        assert load_eagle3_draft(path, config, torch.float32, "cpu").target_layer_ids == (1, 1, 0)


def test_draft_that_does_not_fit_names_both_numbers(tmp_path: Path) -> None:
    wide = write_eagle3_draft(tmp_path / "wide", {**TARGET, "hidden_size": 128})
    with pytest.raises(ValueError, match="draft hidden_size 128 does not match target hidden_size 64"):
        load_eagle3_draft(wide, TARGET, torch.float32, "cpu", torch.randn(256, 64))
    other_vocab = write_eagle3_draft(tmp_path / "vocab", {**TARGET, "vocab_size": 300})
    with pytest.raises(ValueError, match="draft vocab_size 300 does not match target vocab_size 256"):
        load_eagle3_draft(other_vocab, TARGET, torch.float32, "cpu", torch.randn(256, 64))
    ok = write_eagle3_draft(tmp_path / "ok", TARGET)
    with pytest.raises(ValueError, match=r"target embedding has shape \[256, 32\], expected \[256, 64\]"):
        load_eagle3_draft(ok, TARGET, torch.float32, "cpu", torch.randn(256, 32))


# ----- the reference: recompute everything, no cache -----


class Reference:
    """The draft network written out again over whole sequences, with transformers' Llama pieces."""

    def __init__(self, path: Path, embedding: torch.Tensor) -> None:
        raw = json.loads((path / "config.json").read_text())
        self.config = LlamaConfig(**{k: v for k, v in raw.items() if k != "architectures"})
        from safetensors.torch import load_file

        self.w = load_file(str(path / "model.safetensors"))
        self.embedding = embedding
        self.rope = LlamaRotaryEmbedding(self.config)
        d2t = self.w.get("d2t")
        n = raw["draft_vocab_size"]
        self.to_target = torch.arange(n) + (d2t if d2t is not None else 0)

    def norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        layer = LlamaRMSNorm(x.shape[-1], eps=self.config.rms_norm_eps)
        layer.weight.data = self.w[f"{name}.weight"]
        return layer(x)

    def outputs(self, tokens: list[int], hidden: list[torch.Tensor]) -> torch.Tensor:
        """Pre-norm outputs [T, H]: position i reads the embedding of tokens[i] and hidden[i] (already fc'd)."""
        w, c = self.w, self.config
        n, d = len(tokens), c.head_dim
        hs = torch.stack(hidden)
        x = torch.cat(
            [self.norm("midlayer.input_layernorm", self.embedding[tokens]), self.norm("midlayer.hidden_norm", hs)], -1
        )
        q = (x @ w["midlayer.self_attn.q_proj.weight"].T).view(n, -1, d).transpose(0, 1)[None]
        k = (x @ w["midlayer.self_attn.k_proj.weight"].T).view(n, -1, d).transpose(0, 1)[None]
        v = (x @ w["midlayer.self_attn.v_proj.weight"].T).view(n, -1, d).transpose(0, 1)[None]
        cos, sin = self.rope(x[None], torch.arange(n)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        scores = scores.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
        attn = (scores.softmax(-1) @ v)[0].transpose(0, 1).reshape(n, -1) @ w["midlayer.self_attn.o_proj.weight"].T
        h = hs + attn
        m = self.norm("midlayer.post_attention_layernorm", h)
        mlp = (
            torch.nn.functional.silu(m @ w["midlayer.mlp.gate_proj.weight"].T)
            * (m @ w["midlayer.mlp.up_proj.weight"].T)
        ) @ w["midlayer.mlp.down_proj.weight"].T
        return h + mlp

    def logprobs(self, out: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.norm("norm", out) @ self.w["lm_head.weight"].T, -1)

    def chain(self, next_tokens: list[int], aux: torch.Tensor, steps: int) -> list[int]:
        """Greedy draft after positions 0 .. len - 1, recomputing the whole sequence at every step."""
        tokens = list(next_tokens)
        hidden = list(aux @ self.w["fc.weight"].T)
        drafted: list[int] = []
        for _ in range(steps):
            out = self.outputs(tokens, hidden)[-1]
            drafted.append(int(self.to_target[int(self.logprobs(out).argmax())]))
            tokens.append(drafted[-1])
            hidden.append(out)
        return drafted


def setup_pair(tmp_path: Path, draft_vocab_size: int | None = None) -> tuple[Eagle3Drafter, Reference]:
    path = write_eagle3_draft(tmp_path, TARGET, seed=1, draft_vocab_size=draft_vocab_size)
    embedding = torch.randn(TARGET["vocab_size"], TARGET["hidden_size"], generator=torch.Generator().manual_seed(2))
    return load_eagle3_draft(path, TARGET, torch.float32, "cpu", embedding), Reference(path, embedding)


def inputs(n: int, seed: int = 3) -> tuple[list[int], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TARGET["vocab_size"], (n,), generator=g).tolist(), torch.randn(n, 3 * 64, generator=g)


@pytest.mark.parametrize("draft_vocab_size", [None, 100])
def test_extend_and_draft_match_recomputation(tmp_path: Path, draft_vocab_size: int | None) -> None:
    drafter, ref = setup_pair(tmp_path, draft_vocab_size)
    tokens, aux = inputs(30)  # past the rope's original length (16): the llama3-scaled band matters
    start = 0
    for chunk in (11, 1, 6, 12):  # a prompt, then verified steps of various sizes
        end = start + chunk
        drafter.extend(7, torch.tensor(tokens[start:end]), aux[start:end], start)
        start = end
        # Drafting twice in a row gives the same chain: the scratch KV it writes does not leak into state.
        assert drafter.draft(7, 4) == drafter.draft(7, 4) == ref.chain(tokens[:end], aux[:end], 4)
    assert drafter.length(7) == 30


def test_truncate_then_draft_equals_fresh_drafter(tmp_path: Path) -> None:
    drafter, ref = setup_pair(tmp_path, 100)
    tokens, aux = inputs(20)
    drafter.extend(1, torch.tensor(tokens[:14]), aux[:14], 0)
    drafter.draft(1, 3)
    drafter.truncate(1, 9)
    fresh, _ = setup_pair(tmp_path / "fresh", 100)
    fresh.extend(2, torch.tensor(tokens[:9]), aux[:9], 0)
    assert drafter.length(1) == 9
    assert drafter.draft(1, 3) == fresh.draft(2, 3) == ref.chain(tokens[:9], aux[:9], 3)
    # Re-extending after the rollback, with other tokens than before.
    other, other_aux = inputs(20, seed=9)
    drafter.extend(1, torch.tensor(other[9:15]), other_aux[9:15], 9)
    fresh.extend(2, torch.tensor(other[9:15]), other_aux[9:15], 9)
    expected = ref.chain(tokens[:9] + other[9:15], torch.cat([aux[:9], other_aux[9:15]]), 3)
    assert drafter.draft(1, 3) == fresh.draft(2, 3) == expected
    # Extending from below the held length rolls back implicitly.
    drafter.extend(1, torch.tensor(tokens[9:14]), aux[9:14], 9)
    assert drafter.draft(1, 3) == ref.chain(tokens[:14], aux[:14], 3)


def test_sequences_are_independent_and_release_forgets(tmp_path: Path) -> None:
    drafter, ref = setup_pair(tmp_path)
    a, aux_a = inputs(12, seed=4)
    b, aux_b = inputs(8, seed=5)
    drafter.extend(1, torch.tensor(a), aux_a, 0)
    drafter.extend(2, torch.tensor(b), aux_b, 0)
    assert drafter.draft(1, 3) == ref.chain(a, aux_a, 3)
    assert drafter.draft(2, 3) == ref.chain(b, aux_b, 3)
    drafter.release(1)
    assert drafter.length(1) == 0
    with pytest.raises(ValueError, match="no extended positions"):
        drafter.draft(1, 3)
    with pytest.raises(ValueError, match="gap"):
        drafter.extend(2, torch.tensor(b[:2]), aux_b[:2], 10)
    assert drafter.draft(2, 3) == ref.chain(b, aux_b, 3)


def test_tree_with_topk_1_is_the_chain(tmp_path: Path) -> None:
    drafter, _ = setup_pair(tmp_path, 100)
    tokens, aux = inputs(15)
    drafter.extend(3, torch.tensor(tokens), aux, 0)
    assert drafter.draft_tree(3, 4, 1, 5) == (drafter.draft(3, 4), [-1, 0, 1, 2])


@pytest.mark.parametrize(("steps", "topk", "num_draft_tokens"), [(3, 2, 8), (4, 3, 10), (2, 4, 12), (3, 4, 5)])
def test_batched_tree_is_the_node_by_node_tree(tmp_path: Path, steps: int, topk: int, num_draft_tokens: int) -> None:
    """Each depth's frontier in one batch through the lean step (scratch slots, tree mask) draws the same tree."""
    drafter, _ = setup_pair(tmp_path, 100)
    tokens, aux = inputs(15)
    drafter.extend(3, torch.tensor(tokens), aux, 0)
    got = drafter.draft_tree(3, steps, topk, num_draft_tokens)
    assert got == drafter.draft_tree_reference(3, steps, topk, num_draft_tokens)
    assert len(got[0]) == num_draft_tokens - 1
    assert drafter.length(3) == 15  # scratch only


def test_tree_nodes_are_the_best_children_of_their_parents(tmp_path: Path) -> None:
    drafter, ref = setup_pair(tmp_path, 100)
    tokens, aux = inputs(15)
    drafter.extend(3, torch.tensor(tokens), aux, 0)
    tree, parents = drafter.draft_tree(3, 3, 2, 8)
    assert len(tree) == len(parents) == 7
    assert all(-1 <= p < i for i, p in enumerate(parents))
    hidden = list(aux @ ref.w["fc.weight"].T)

    def path_of(i: int) -> list[int]:
        return [*path_of(parents[i]), tree[i]] if i >= 0 else []

    def top2(path: list[int]) -> set[int]:
        """The two best next tokens after drafting `path`, by recomputation."""
        seq, hs = list(tokens), list(hidden)
        for token in path:
            out = ref.outputs(seq, hs)[-1]
            seq.append(token)
            hs.append(out)
        out = ref.outputs(seq, hs)[-1]
        return {int(ref.to_target[i]) for i in ref.logprobs(out).topk(2).indices}

    assert {tree[i] for i, p in enumerate(parents) if p == -1} == top2([])
    for i, p in enumerate(parents):
        assert tree[i] in top2(path_of(p))


def test_tree_keeps_the_best_nodes_by_cumulative_log_probability(tmp_path: Path) -> None:
    """S3 K2 draws 2 + 2 * 4 = 10 nodes; N 6 keeps the 5 whose root-to-node log-probabilities sum highest, each
    score recomputed by the reference along the node's path."""
    drafter, ref = setup_pair(tmp_path, 100)
    tokens, aux = inputs(15)
    drafter.extend(3, torch.tensor(tokens), aux, 0)
    hidden = list(aux @ ref.w["fc.weight"].T)
    from_target = {int(t): i for i, t in enumerate(ref.to_target)}

    def score(path: list[int]) -> float:
        seq, hs, total = list(tokens), list(hidden), 0.0
        for token in path:
            out = ref.outputs(seq, hs)[-1]
            total += float(ref.logprobs(out)[from_target[token]].detach())
            seq.append(token)
            hs.append(out)
        return total

    def paths(tree: list[int], parents: list[int]) -> list[tuple[int, ...]]:
        out: list[tuple[int, ...]] = []
        for t, p in zip(tree, parents, strict=True):
            out.append((*(out[p] if p >= 0 else ()), t))
        return out

    every = paths(*drafter.draft_tree(3, 3, 2, 11))
    assert len(set(every)) == 10
    kept = paths(*drafter.draft_tree(3, 3, 2, 6))
    scores = {path: score(list(path)) for path in every}
    best = sorted(every, key=lambda path: -scores[path])[:5]
    assert set(kept) == set(best), (kept, best)


def test_checkpoint_layouts_with_model_prefix_and_embedding(tmp_path: Path) -> None:
    """Trainer layouts (`model.layers.0.*`) load like SGLang's `midlayer.*`, and a draft's own embedding wins."""
    from safetensors.torch import save_file

    path = write_eagle3_draft(tmp_path / "a", TARGET, seed=1, with_embedding=True)
    config = json.loads((path / "config.json").read_text())
    renamed = {
        "model." + k.replace("midlayer.", "layers.0."): v
        for k, v in draft_tensors(config, 1, with_embedding=True).items()
    }
    other = tmp_path / "b"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(config))
    save_file(renamed, str(other / "model.safetensors"))
    tokens, aux = inputs(10)
    drafts = []
    for p in (path, other):
        drafter = load_eagle3_draft(p, TARGET, torch.float32, "cpu", torch.zeros(256, 64))
        drafter.extend(0, torch.tensor(tokens), aux, 0)
        drafts.append(drafter.draft(0, 4))
    assert drafts[0] == drafts[1]
    assert drafts[0] == Reference(path, draft_tensors(config, 1, True)["embed_tokens.weight"]).chain(tokens, aux, 4)


def test_demo_draft_fits_the_demo_model() -> None:
    """The shipped draft loads against the shipped model, sharing its embedding, in the published layout."""
    from safetensors import safe_open

    from herd.demo import DRAFT_PATH, MODEL_PATH

    if not (DRAFT_PATH / "model.safetensors").is_file():
        pytest.skip("no trained demo draft in this checkout")
    with safe_open(str(DRAFT_PATH / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    with safe_open(str(MODEL_PATH / "model.safetensors"), "pt") as f:
        embedding = f.get_tensor("language_model.model.embed_tokens.weight")
    assert {"fc.weight", "midlayer.self_attn.q_proj.weight", "lm_head.weight", "d2t", "t2d"} <= names
    assert "embed_tokens.weight" not in names
    drafter = load_eagle3_draft(DRAFT_PATH, ModelConfig.from_hf(MODEL_PATH), torch.float32, "cpu", embedding)
    assert drafter.target_layer_ids == (0, 2, 4)
    tokens, aux = torch.tensor([5, 6, 7]), torch.zeros(3, 3 * 256)
    drafter.extend(0, tokens, aux, 0)
    assert len(drafter.draft(0, 3)) == 3


def test_draft_step_without_the_token_table_drafts_the_same(tmp_path: Path, monkeypatch) -> None:
    """A large vocabulary computes the embedding half of q/k/v per step instead of looking it up."""
    import herd.models.eagle3_step as eagle3_step

    monkeypatch.setattr(eagle3_step, "TOKEN_TABLE_BYTES", 0)
    drafter, ref = setup_pair(tmp_path)
    assert drafter.step.qkv_of_token is None
    tokens, aux = inputs(12)
    drafter.extend(5, torch.tensor(tokens), aux, 0)
    assert drafter.draft(5, 3) == ref.chain(tokens, aux, 3)


@pytest.mark.skipif(not cpu_packing_available(torch.device("cpu"), torch.bfloat16), reason="needs oneDNN's packed bf16")
@pytest.mark.parametrize("kernel", [False, True])
def test_packed_bf16_draft_step_stays_close_to_fp32(tmp_path: Path, kernel: bool, monkeypatch) -> None:
    """The CPU's bf16 matmuls (oneDNN's packed ones, or herd's GEMV kernel where it runs) change the draft's numbers
    by bf16 rounding only (its guesses, never the output: the target verifies them)."""
    if kernel and gemv_ops() is None:
        pytest.skip("herd's CPU kernels did not build here (or no AVX-512)")
    monkeypatch.setattr(eagle3_step, "cpu_kernels_enabled", lambda: kernel)
    drafter, _ = setup_pair(tmp_path)
    packed, _ = setup_pair(tmp_path / "packed")
    packed.packed_matmuls = True
    tokens, aux = inputs(12)
    for d in (drafter, packed):
        d.extend(0, torch.tensor(tokens), aux, 0)
    assert packed.step.packed and not drafter.step.packed
    assert packed.step.w_o.is_mkldnn != kernel  # the kernel reads the plain bf16 weight
    assert drafter.length(0) == packed.length(0) == 12
    torch.testing.assert_close(packed._seqs[0].out[:12], drafter._seqs[0].out[:12], atol=0.05, rtol=0.05)
    assert len(packed.draft(0, 3)) == 3
