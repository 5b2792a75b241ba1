"""How many KV blocks each pool gets.

`--max-total-tokens` fixes the full pool directly. Otherwise the KV cache takes what is left
of `--mem-fraction-static` x memory once the weights are in: on a GPU the memory measured free after
loading less the (1 - fraction) kept for activations and CUDA graphs; on the CPU a configured budget
(`--cpu-memory-budget-gb`). The local (chunked-layer) pool holds
`--swa-full-tokens-ratio` tokens per full-pool token, as in SGLang, but never less than one
sequence's chunk, below which no request could run.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from herd.config import ArgumentError, ModelConfig
from herd.config.engine import CacheConfig
from herd.layers.attention import PagedKVStorage

logger = logging.getLogger(__name__)

GPU_MEM_FRACTION = 0.88
CPU_MEM_FRACTION = 0.9


@dataclass(frozen=True)
class KVPlan:
    num_full_blocks: int
    num_local_blocks: int
    block_size: int
    chunk_size: int | None


def gpu_kv_bytes(free: int, total: int, fraction: float) -> float:
    """SGLang's rule: the KV cache gets what is free once the weights are loaded (measured, so the CUDA context
    and anything else on the GPU count too), less the (1 - fraction) of the device kept for activations and
    CUDA graphs, which are captured after the KV cache is allocated."""
    return free - total * (1 - fraction)


def plan_kv_cache(
    cache: CacheConfig,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    weight_bytes: int,
    tp_size: int = 1,
) -> KVPlan:
    has_local = any(spec.chunked for spec in config.layers)
    chunk = config.attention_chunk_size if has_local else None
    block = cache.page_size if chunk is None else math.gcd(cache.page_size, chunk)
    if block != cache.page_size:
        logger.info("page size %d -> %d so that it divides the attention chunk (%d)", cache.page_size, block, chunk)
    full_per_token = PagedKVStorage.bytes_per_token(config, dtype, chunked=False, tp_size=tp_size)
    local_per_token = PagedKVStorage.bytes_per_token(config, dtype, chunked=True, tp_size=tp_size)
    ratio = cache.swa_full_tokens_ratio if has_local else 0.0

    if cache.max_total_tokens is not None:
        full_tokens = cache.max_total_tokens
    else:
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            fraction = cache.mem_fraction_static or GPU_MEM_FRACTION
            kv_bytes = gpu_kv_bytes(free, total, fraction)
            logger.info("GPU: %.2f GiB of %.2f GiB free after the weights (%.2f GiB); KV cache %.2f GiB "
                        "(--mem-fraction-static %.2f)", free / 2**30, total / 2**30, weight_bytes / 2**30,
                        max(kv_bytes, 0) / 2**30, fraction)  # fmt: skip
        else:
            total = int(cache.cpu_memory_budget_gb * 2**30) // tp_size  # the ranks share the host's budget
            fraction = cache.mem_fraction_static or CPU_MEM_FRACTION
            kv_bytes = total * fraction - weight_bytes
        if kv_bytes <= 0:
            raise ArgumentError(
                f"the weights ({weight_bytes / 2**30:.2f} GiB) leave no room for the KV cache in "
                f"--mem-fraction-static {fraction} of {total / 2**30:.2f} GiB; raise --mem-fraction-static"
                + ("" if device.type == "cuda" else " or --cpu-memory-budget-gb")
            )
        full_tokens = int(kv_bytes / (full_per_token + ratio * local_per_token))

    num_full = max(1, full_tokens // block)
    num_local = 0
    if has_local:
        assert chunk is not None
        num_local = max(int(num_full * ratio), chunk // block + 1)
    return KVPlan(num_full_blocks=num_full, num_local_blocks=num_local, block_size=block, chunk_size=chunk)
