"""The CPU worker's choice of thread count for decode steps (herd.worker.thread_tuner), by measured step times."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

from herd.llm import LLM
from herd.sampling import SamplingParams
from herd.worker import thread_tuner, worker
from herd.worker.thread_tuner import EARLY_LOSS, FIRST_PERIOD, FIRST_TRIAL, MAX_PERIOD, WINDOW, ThreadTuner


def run(tuner: ThreadTuner, batch: int, steps: int, cost: dict[int, float]) -> list[int]:
    """`steps` decode steps of `batch` sequences, each taking cost[threads]; the thread counts they ran with."""
    used = []
    for _ in range(steps):
        threads = tuner.threads(batch)
        used.append(threads)
        tuner.record(batch, cost[threads])
    return used


def test_a_faster_count_takes_over_after_one_trial(caplog: pytest.LogCaptureFixture) -> None:
    tuner = ThreadTuner(2)
    with caplog.at_level(logging.INFO, logger=thread_tuner.__name__):
        used = run(tuner, 64, FIRST_TRIAL + WINDOW + 10, {2: 0.019, 1: 0.014})
    assert used[:FIRST_TRIAL] == [2] * FIRST_TRIAL  # all cores first, for a window of steps
    assert used[FIRST_TRIAL:] == [1] * (WINDOW + 10)  # the trial, then kept
    assert "decode steps of 64-127 sequences: 1 threads (14.00 ms a step against 19.00 with 2)" in caplog.text


def test_a_count_that_is_not_clearly_faster_is_tried_ever_more_rarely() -> None:
    tuner = ThreadTuner(4)
    used = run(tuner, 1, 6000, {4: 0.010, 3: 0.0099})  # 1% faster: within the margin
    trials = [i for i in range(1, len(used)) if used[i] == 3 and used[i - 1] == 4]
    assert used[0] == 4 and used.count(3) == WINDOW * len(trials)
    assert trials[0] == FIRST_TRIAL
    gaps = [b - a - WINDOW for a, b in itertools.pairwise(trials)]
    assert gaps[:4] == [2 * FIRST_PERIOD, 4 * FIRST_PERIOD, 8 * FIRST_PERIOD, 16 * FIRST_PERIOD]
    assert max(gaps) == MAX_PERIOD
    assert used.count(3) / len(used) < 0.02


def test_a_trial_clearly_slower_than_every_current_step_ends_early() -> None:
    tuner = ThreadTuner(2)
    run(tuner, 64, FIRST_TRIAL + WINDOW, {2: 0.019, 1: 0.014})  # settled on 1 thread
    used = run(tuner, 64, FIRST_PERIOD + EARLY_LOSS + 2 * FIRST_PERIOD + EARLY_LOSS, {2: 0.029, 1: 0.014})
    assert used == ([1] * FIRST_PERIOD + [2] * EARLY_LOSS) + ([1] * 2 * FIRST_PERIOD + [2] * EARLY_LOSS)
    # A trial step within the current steps' spread is not judged early: the trial runs its whole window.
    tuner = ThreadTuner(2)
    for seconds in (0.010, 0.020, 0.010, 0.020, 0.010, 0.020):
        tuner.record(64, seconds)
    assert run(tuner, 64, WINDOW, {1: 0.0205}) == [1] * WINDOW


def test_batch_sizes_are_judged_apart_and_a_change_of_load_is_followed() -> None:
    tuner = ThreadTuner(2)
    run(tuner, 64, 200, {2: 0.019, 1: 0.014})  # many sequences: the HTTP side needs a core
    run(tuner, 3, 200, {2: 0.003, 1: 0.005})  # a few: all cores win
    assert tuner.threads(64) == 1 and tuner.threads(100) == 1
    assert tuner.threads(3) == 2 and tuner.threads(2) == 2
    used = run(tuner, 64, 400, {2: 0.010, 1: 0.014})  # the load beside the engine went away
    assert used[-100:].count(1) <= WINDOW  # back on all cores, a trial of one at most


def test_one_thread_leaves_nothing_to_choose() -> None:
    with pytest.raises(ValueError, match="at least 2 threads"):
        ThreadTuner(1)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_the_engine_moves_to_the_faster_count_and_decodes_the_same_tokens(
    scout_ckpt, monkeypatch: pytest.MonkeyPatch, restore_threads
) -> None:
    """An engine whose decode steps are slow at two threads (a clock that says so) runs them at one after a
    trial; the tokens are those of an engine that never changed its threads."""
    path, _ = scout_ckpt
    params = SamplingParams(temperature=0.0, max_tokens=FIRST_TRIAL + 3 * WINDOW, ignore_eos=True)  # not in a 2nd trial
    prompt = [{"prompt_token_ids": list(range(3, 40))}]
    expected = LLM(str(path), dtype="float32").generate(prompt, params)[0].outputs[0].token_ids  # OMP_NUM_THREADS set

    monkeypatch.delenv("OMP_NUM_THREADS")
    torch.set_num_threads(2)
    now = [0.0]

    def clock() -> float:  # each reading advances by a step's cost at the current thread count
        now[0] += 0.010 if torch.get_num_threads() == 2 else 0.004
        return now[0]

    monkeypatch.setattr(worker, "perf_counter", clock)
    llm = LLM(str(path), dtype="float32")
    tuner = llm.engine.core.workers[0].thread_tuner
    assert tuner is not None and tuner.max_threads == 2
    got = llm.generate(prompt, params)[0].outputs[0].token_ids
    assert got == expected
    assert tuner.threads(1) == 1


def test_omp_num_threads_is_kept(scout_ckpt) -> None:
    """conftest pins OMP_NUM_THREADS for the suite: no tuner then, and the thread count is left alone."""
    assert LLM(str(scout_ckpt[0]), dtype="float32").engine.core.workers[0].thread_tuner is None
