"""Decode CUDA graphs' inputs: batches padded to a captured size, persistent buffers refilled every step,
padding rows writing only to the scratch block. On a CPU the runner replays eagerly through those same
buffers, so the engine's tokens must still equal transformers'; on a GPU (gpu_check.sh) graphs are captured."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

pytest.importorskip("triton")

from herd.llm import LLM
from herd.sampling import SamplingParams
from herd.worker import cuda_graphs
from herd.worker import worker as worker_module

from test_engine import hf_greedy


def test_capture_sizes_pad_by_at_most_seven_rows() -> None:
    assert cuda_graphs.capture_sizes(1) == [1]
    assert cuda_graphs.capture_sizes(12) == [1, 2, 4, 8, 12]
    sizes = cuda_graphs.capture_sizes(256)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256
    assert all(b - a <= 8 for a, b in itertools.pairwise(sizes))


def test_padded_decode_through_graph_buffers_matches_transformers(scout_ckpt, monkeypatch) -> None:
    """Three sequences of different lengths and budgets decode as batches of 3, 2, 1 padded to 4, 2, 1 rows."""
    monkeypatch.setattr(worker_module, "graphs_enabled", lambda *args: True)
    monkeypatch.setattr(
        worker_module, "build_decode_graphs", functools.partial(cuda_graphs.build_decode_graphs, capture=False)
    )
    path, ref = scout_ckpt
    llm = LLM(str(path), dtype="float32", attention_backend="triton", cuda_graph_max_bs=4, page_size=4)
    runner = llm.engine.core.workers[0].graphs
    assert runner is not None and runner.sizes == [1, 2, 4]
    sizes: list[int] = []
    run = runner.run

    def counting(ids: torch.Tensor, *args: object) -> torch.Tensor:
        sizes.append(ids.shape[0])
        return run(ids, *args)  # type: ignore[arg-type]

    runner.run = counting  # type: ignore[method-assign]
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (3, 9, 6)]
    budgets = [12, 6, 3]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in budgets]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert {1, 2, 3} <= set(sizes)
    expected = [hf_greedy(ref, p, m) for p, m in zip(prompts, budgets, strict=True)]
    assert [o.outputs[0].token_ids for o in outputs] == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captured_graphs_give_the_eager_tokens(scout_ckpt) -> None:
    """On a GPU: decode through captured graphs (batches 3, 2, 1 padded) == eager decode == transformers."""
    path, ref = scout_ckpt
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (3, 9, 6)]
    budgets = [12, 6, 3]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in budgets]
    batch = [{"prompt_token_ids": p} for p in prompts]
    tokens = {}
    for disable in (False, True):
        llm = LLM(
            str(path), dtype="float32", attention_backend="triton", cuda_graph_max_bs=4, disable_cuda_graph=disable
        )
        worker = llm.engine.core.workers[0]
        assert (worker.graphs is None) == disable
        tokens[disable] = [o.outputs[0].token_ids for o in llm.generate(batch, params, use_tqdm=False)]
        del llm
    assert tokens[False] == tokens[True]
    assert tokens[False] == [hf_greedy(ref, p, m) for p, m in zip(prompts, budgets, strict=True)]
