"""herd's CPU kernels on their own thread pool (herd/kernels/cpu/claim_pool.cpp) at decode rows: each task runs once,
so results equal the one-thread ones bit for bit, call after call, also when two Python threads call at once.

The suite pins one thread (conftest), where the pool runs every call inline: these tests lift the pin."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from herd.kernels.cpu import gemv_ops, rest_pool

pytestmark = pytest.mark.skipif(gemv_ops() is None, reason="herd's CPU kernels did not build here (or no AVX-512)")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _calls(gen: torch.Generator) -> list:
    """(op, args) of each kind that takes the pool: weights of many 256 KiB tasks, 1-8 rows, attention's tasks."""
    weight = torch.randn(2048, 1024, generator=gen).bfloat16()  # 4 MiB: 16 tasks
    gate_up = torch.randn(3, 1024, 512, generator=gen).bfloat16()
    down = torch.randn(3, 512, 512, generator=gen).bfloat16()
    cache = torch.randn(2, 64, 16, 4, 64, generator=gen).bfloat16()
    calls = []
    for rows in (1, 3, 8):
        x = torch.randn(rows, 1024, generator=gen).bfloat16()
        calls.append((torch.ops.herd_cpu.gemv_bf16, (x, weight)))
        ids = torch.randint(0, 3, (rows,), generator=gen)
        calls.append((torch.ops.herd_cpu.swiglu_experts_bf16, (x[:, :512], ids, gate_up, down)))
        q = torch.randn(rows, 16, 64, generator=gen).bfloat16()
        table = torch.randint(0, 64, (rows, 8), generator=gen)
        offsets, lengths = torch.zeros(rows, dtype=torch.long), torch.full((rows,), 100)
        calls.append((torch.ops.herd_cpu.paged_decode_attention, (q, cache[0], cache[1], table, offsets, lengths, 0.1)))
    return calls


def _one_thread_results(calls: list) -> list:
    """Each call's output with the pool's work all on the calling thread; two threads again after."""
    torch.set_num_threads(1)
    expected = [op(*args) for op, args in calls]
    torch.set_num_threads(2)
    return expected


def test_two_threads_give_the_one_thread_results(two_threads) -> None:
    calls = _calls(torch.Generator().manual_seed(0))
    expected = _one_thread_results(calls)
    for _ in range(50):
        for (op, args), want in zip(calls, expected, strict=True):
            assert torch.equal(op(*args), want), op


def test_calls_from_two_python_threads_at_once(two_threads) -> None:
    calls = _calls(torch.Generator().manual_seed(1))
    expected = [op(*args) for op, args in calls]
    failures: list[str] = []

    def run() -> None:
        for _ in range(30):
            for (op, args), want in zip(calls, expected, strict=True):
                if not torch.equal(op(*args), want):
                    failures.append(str(op))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_workers_put_to_rest_between_calls_give_the_same_results(two_threads) -> None:
    """The server's engine process sends its workers to sleep after each step (rest_pool); the next call wakes them,
    and every call still runs each task once."""
    calls = _calls(torch.Generator().manual_seed(2))
    expected = _one_thread_results(calls)
    for _ in range(10):
        for (op, args), want in zip(calls, expected, strict=True):
            assert torch.equal(op(*args), want), op
            rest_pool()
        time.sleep(0.001)  # the workers are asleep by now
