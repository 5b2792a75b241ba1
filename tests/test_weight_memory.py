"""Memory planning knows quantized sizes: weights that cannot fit fail at start, before any weight is read,
naming the bytes needed and available and the flags that would fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from herd.config import ArgumentError, ModelConfig
from herd.layers.attention import get_attention_backend
from herd.layers.factory import LayerFactory
from herd.layers.quantization.select import select_quantization
from herd.layers.quantization.unquantized import UnquantizedConfig
from herd.llm import LLM
from herd.models.llama4_text import Llama4ForCausalLM
from herd.worker.weight_memory import check_weights_fit, weight_bytes

SCOUT = ModelConfig.from_dict(
    json.loads((Path(__file__).parents[1] / "benchmarks/configs/scout_shape.json").read_text())
)
CPU = torch.device("cpu")
GiB = 2**30


def meta_scout(quantization: str | None) -> torch.nn.Module:
    factory = LayerFactory(select_quantization(None, "", quantization, UnquantizedConfig()))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            return Llama4ForCausalLM(SCOUT, factory, get_attention_backend("torch_native"))
    finally:
        torch.set_default_dtype(previous)


def test_scout_sizes_per_format() -> None:
    bf16 = weight_bytes(meta_scout(None)).total
    assert 200 * GiB < bf16 < 205 * GiB  # Scout's 108.6 B parameters in bf16 (the text model)
    w8 = weight_bytes(meta_scout("w8a16")).total
    w4 = weight_bytes(meta_scout("w4a16")).total
    # Embeddings and router stay bf16 (2 GiB): the rest halves, then halves again.
    assert 0.5 * bf16 < w8 < 0.52 * bf16
    assert 0.26 * bf16 < w4 < 0.28 * bf16


def test_scout_on_a_128_gib_cpu_budget_names_bytes_and_the_flags_that_fit() -> None:
    with pytest.raises(ArgumentError) as error:
        check_weights_fit(
            meta_scout(None), device=CPU, mem_fraction=None, cpu_budget_gb=128, tp_size=1, quantization=None
        )
    message = str(error.value)
    need = weight_bytes(meta_scout(None)).total
    assert f"{need} bytes" in message and f"{int(128 * GiB * 0.9)} bytes" in message
    assert "--quantization w4a16" in message and "--quantization w8a16" in message  # 55 and 102 GiB fit in 115
    assert "--cpu-memory-budget-gb" in message
    # ... and with w4a16 it does fit.
    check_weights_fit(
        meta_scout("w4a16"), device=CPU, mem_fraction=None, cpu_budget_gb=128, tp_size=1, quantization="w4a16"
    )


def test_a_checkpoint_too_big_for_the_budget_fails_at_start(scout_ckpt) -> None:
    path, model = scout_ckpt
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    with pytest.raises(ArgumentError, match=r"the weights need .* per rank but .* is available.*would fit: .*w4a16"):
        LLM(str(path), dtype="float32", cpu_memory_budget_gb=need / GiB * 0.5)
