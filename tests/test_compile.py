"""--enable-torch-compile: the decode step compiles as one graph (fullgraph=True: no host sync, no Python
branching on tensor values), gives the same tokens as eager and as transformers, and compiles once per decode
shape family: a second run of the same shapes must not recompile (torch._dynamo's error_on_recompile)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch._dynamo

from herd.kernels.cpu import gemv_ops
from herd.llm import LLM
from herd.sampling import SamplingParams

from checkpoints import CHUNK
from test_engine import hf_greedy

# Contexts 2 * CHUNK + 1 .. 3 * CHUNK - 1 while decoding: one chunk window and one block-table width, so
# the test pays for a single compilation.
PROMPT_LEN = 2 * CHUNK + 1
MAX_TOKENS = CHUNK - 1


def _prompts(seed: int, n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (PROMPT_LEN,), generator=gen).tolist() for _ in range(n)]


def _generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def _wrap_compiled(llm: LLM, around: Callable[..., torch.Tensor]) -> None:
    worker = llm.engine.core.workers[0]
    assert worker.compiled_decode is not None
    compiled = worker.compiled_decode
    worker.compiled_decode = lambda *args: around(compiled, *args)  # type: ignore[assignment]


def test_compiled_decode_matches_eager_and_transformers(scout_ckpt) -> None:
    path, ref = scout_ckpt
    first, second = _prompts(8, 2), _prompts(9, 2)
    eager = _generate(LLM(str(path), dtype="float32"), first + second)

    llm = LLM(str(path), dtype="float32", enable_torch_compile=True)
    calls: list[object] = []
    _wrap_compiled(llm, lambda compiled, *args: calls.append(args) or compiled(*args))
    got = _generate(llm, first)
    # Every one-token step: the decode steps, and the prompt's last token (a prefill step never crosses a
    # chunk boundary, so position 2 * CHUNK runs alone).
    assert len(calls) == MAX_TOKENS
    with torch._dynamo.config.patch(error_on_recompile=True):  # same shapes, other tokens and slots
        got += _generate(llm, second)
    assert len(calls) == 2 * MAX_TOKENS
    assert got == eager
    assert got == [hf_greedy(ref, p, MAX_TOKENS) for p in first + second]


@pytest.mark.skipif(gemv_ops() is None, reason="herd's CPU kernels need a C++ compiler and AVX-512")
def test_compiled_bf16_decode_runs_herd_kernels_without_recompiling(scout_ckpt) -> None:
    path, _ = scout_ckpt
    llm = LLM(str(path), dtype="bfloat16", enable_torch_compile=True)
    events: list[set[str]] = []

    def profiled(compiled: Callable[..., torch.Tensor], *args: object) -> torch.Tensor:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = compiled(*args)
        events.append({e.name for e in prof.events()})
        return out

    first = _generate(llm, _prompts(10, 1))
    _wrap_compiled(llm, profiled)
    with torch._dynamo.config.patch(error_on_recompile=True):
        _generate(llm, _prompts(11, 1))
    assert len(first) == 1 and len(events) == MAX_TOKENS
    # Inside the compiled step: herd's GEMV and RMSNorm (their fake kernels let the graph hold them), and the
    # eager experts and paged attention as opaque ops, with no recompilation.
    for names in events:
        assert {"herd_cpu::gemv_bf16", "herd_cpu::rms_norm", "herd::opaque_call"} <= names
        assert any(name.startswith("Torch-Compiled Region") for name in names)


@pytest.mark.skipif(gemv_ops() is None, reason="herd's CPU kernels need a C++ compiler and AVX-512")
def test_compiled_w8a8_decode_matches_eager(scout_ckpt) -> None:
    """The W8A8 INT8 kernel's switch is read while tracing (it once sent dynamo into the kernels' build)."""
    path, _ = scout_ckpt
    prompts = _prompts(12, 1)
    eager = _generate(LLM(str(path), dtype="float32", quantization="w8a8_int8"), prompts)
    compiled = _generate(LLM(str(path), dtype="float32", quantization="w8a8_int8", enable_torch_compile=True), prompts)
    assert compiled == eager
