"""A CPU whose oneDNN cannot pack bfloat16 weights (no AVX-512 nor AVX-NE-CONVERT: AMD before Zen 4, many laptops).
herd used to fail there while loading any bf16 checkpoint; it now serves it with plain matmuls when bf16 is
asked for, and in float32 for `--dtype auto` (oneDNN emulates bf16 there, several times slower)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from herd.demo import MODEL_PATH
from herd.layers.quantization import unquantized
from herd.llm import LLM
from herd.sampling import SamplingParams

QUESTION = [{"role": "user", "content": "What is 12 * 34?"}]
GREEDY = SamplingParams(temperature=0.0, max_tokens=64)


@pytest.fixture
def no_bf16_packing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    real_pack = unquantized.pack

    def pack(weight: torch.Tensor) -> torch.Tensor:
        if weight.dtype == torch.bfloat16:  # what oneDNN raises on such a CPU
            raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or "
                               "avx512bw, avx512vl and avx512dq")  # fmt: skip
        return real_pack(weight)

    monkeypatch.setattr(unquantized, "pack", pack)
    unquantized._packs.cache_clear()
    yield
    unquantized._packs.cache_clear()


def answer(llm: LLM) -> str:
    return llm.chat(QUESTION, GREEDY, use_tqdm=False)[0].outputs[0].text


def test_bf16_checkpoint_is_served_without_bf16_packing(no_bf16_packing: None) -> None:
    assert not unquantized.cpu_packing_available(torch.device("cpu"), torch.bfloat16)
    assert unquantized.cpu_packing_available(torch.device("cpu"), torch.float32) == torch.backends.mkldnn.is_available()
    llm = LLM(str(MODEL_PATH), dtype="bfloat16")
    assert llm.engine.core.workers[0].dtype == torch.bfloat16
    assert "408" in answer(llm)


def test_dtype_auto_serves_float32_where_bf16_is_emulated(no_bf16_packing: None) -> None:
    auto = LLM(str(MODEL_PATH))  # the demo checkpoint is bfloat16
    assert auto.engine.core.workers[0].dtype == torch.float32
    assert answer(auto) == answer(LLM(str(MODEL_PATH), dtype="float32"))
