"""How the KV pools are sized from --max-total-tokens, --mem-fraction-static and --swa-full-tokens-ratio."""

from __future__ import annotations

import pytest
import torch

from herd.config import ModelConfig
from herd.config.engine import CacheConfig
from herd.config.server_args import ArgumentError, ServerArgs
from herd.layers.attention import PagedKVStorage
from herd.worker.kv_sizing import plan_kv_cache

# 4 layers: 3 chunked (RoPE) + 1 global (NoPE); chunk 64.
CONFIG = ModelConfig.from_dict(
    {
        "architectures": ["Llama4ForCausalLM"],
        "vocab_size": 100,
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "attention_chunk_size": 64,
    }
)
CPU = torch.device("cpu")


def test_max_total_tokens_sets_the_full_pool_and_ratio_the_local_pool() -> None:
    args = CacheConfig(max_total_tokens=4096, swa_full_tokens_ratio=0.5, page_size=16)
    plan = plan_kv_cache(args, CONFIG, torch.float32, CPU, weight_bytes=0)
    assert (plan.num_full_blocks, plan.num_local_blocks, plan.block_size) == (256, 128, 16)


def test_local_pool_never_smaller_than_one_chunk() -> None:
    args = CacheConfig(max_total_tokens=256, swa_full_tokens_ratio=0.01, page_size=16)
    plan = plan_kv_cache(args, CONFIG, torch.float32, CPU, weight_bytes=0)
    assert plan.num_local_blocks == 64 // 16 + 1


def test_page_size_adapts_to_divide_the_chunk() -> None:
    args = CacheConfig(max_total_tokens=1024, page_size=48)
    assert plan_kv_cache(args, CONFIG, torch.float32, CPU, weight_bytes=0).block_size == 16


def test_memory_fraction_of_the_cpu_budget() -> None:
    args = CacheConfig(mem_fraction_static=0.5, cpu_memory_budget_gb=1.0, swa_full_tokens_ratio=0.8)
    weights = 100 * 2**20
    plan = plan_kv_cache(args, CONFIG, torch.bfloat16, CPU, weight_bytes=weights)
    full = PagedKVStorage.bytes_per_token(CONFIG, torch.bfloat16, chunked=False)
    local = PagedKVStorage.bytes_per_token(CONFIG, torch.bfloat16, chunked=True)
    used = plan.num_full_blocks * 16 * full + plan.num_local_blocks * 16 * local
    budget = 0.5 * 2**30 - weights
    assert budget - 16 * (full + local) <= used <= budget
    assert plan.num_local_blocks == int(plan.num_full_blocks * 0.8)


def test_weights_that_leave_no_room_are_a_clear_error() -> None:
    args = CacheConfig(mem_fraction_static=0.1, cpu_memory_budget_gb=1.0)
    with pytest.raises(ArgumentError, match="leave no room for the KV cache.*raise --mem-fraction-static"):
        plan_kv_cache(args, CONFIG, torch.bfloat16, CPU, weight_bytes=2**30)


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"mem_fraction_static": 1.5}, "--mem-fraction-static"),
        ({"swa_full_tokens_ratio": 0.0}, "--swa-full-tokens-ratio"),
        ({"page_size": 0}, "--page-size"),
        ({"chunked_prefill_size": -2}, "--chunked-prefill-size"),
        ({"dtype": "int4"}, "--dtype"),
        ({"attention_backend": "fa9"}, "--attention-backend"),
        ({"cuda_graph_max_bs": 0}, "--cuda-graph-max-bs"),
    ],
)
def test_bad_engine_arguments_name_the_flag(kwargs: dict, flag: str) -> None:
    with pytest.raises(ArgumentError, match=flag):
        ServerArgs(model_path="x", **kwargs)


def test_gpu_plan_takes_measured_free_memory_less_the_activation_reserve(monkeypatch) -> None:
    """On a GPU the weights are already in memory: what cudaMemGetInfo reports free, less (1 - fraction) of
    the device for activations and CUDA graphs, goes to the two pools (here 8 GiB free of 80 GiB at 0.9)."""
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 80 * gib))
    args = CacheConfig(mem_fraction_static=0.9, swa_full_tokens_ratio=0.8)
    plan = plan_kv_cache(args, CONFIG, torch.bfloat16, torch.device("cuda"), weight_bytes=60 * gib)
    full = PagedKVStorage.bytes_per_token(CONFIG, torch.bfloat16, chunked=False)
    local = PagedKVStorage.bytes_per_token(CONFIG, torch.bfloat16, chunked=True)
    used = plan.num_full_blocks * 16 * full + plan.num_local_blocks * 16 * local
    budget = 10 * gib - 0.1 * 80 * gib
    assert budget - 16 * (full + local) <= used <= budget
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (7 * gib, 80 * gib))
    with pytest.raises(ArgumentError, match="raise --mem-fraction-static"):
        plan_kv_cache(args, CONFIG, torch.bfloat16, torch.device("cuda"), weight_bytes=60 * gib)


def test_triton_backend_on_the_cpu_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ArgumentError, match="--attention-backend triton needs a CUDA GPU.*torch_native"):
        ServerArgs(model_path="x", attention_backend="triton", device="cpu")


def test_zero_blocks_clears_the_named_blocks_of_every_layer_and_no_other() -> None:
    storage = PagedKVStorage(CONFIG, num_full_blocks=12, num_local_blocks=10, block_size=4, dtype=torch.bfloat16)
    storage.full.fill_(float("nan"))
    storage.local.fill_(float("nan"))
    full, local = [7, 2, 3, 4, 11], [0, 9, 5]  # unsorted, with a run (2-4) and lone blocks
    storage.zero_blocks(full, local)
    for pool, zeroed in ((storage.full, set(full)), (storage.local, set(local))):
        for block in range(pool.shape[2]):
            values = pool[:, :, block]
            assert bool((values == 0).all()) if block in zeroed else bool(values.isnan().all()), block
