"""How many threads a CPU worker's decode steps use, chosen by timing steps with each count.

On a machine with few cores the engine does not have them to itself: the HTTP process streams every token
(a fifth to a third of a core at 4,000 tokens/s), and a benchmark client or other services may run beside it. OpenMP
splits each operation evenly among its threads and waits for the last, so when one of the engine's threads
loses its core, every operation of the step waits for it to come back. With all cores, the tiny checkpoint
decoding 64 streams over HTTP on 2 cores took 18.8 ms a step; with one thread, leaving a core to the HTTP
side, 15.6 ms; at one stream, or on a model whose steps read memory (scout-mini), all cores are faster by a
third. Which count wins depends on the load, so the worker measures it: each decode batch size (in powers of
two) keeps the count that has been faster, and now and then times a few steps with the other one.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

# Steps timed with each count per comparison, and the share by which the other count must be faster to win.
WINDOW = 6
MARGIN = 0.05
# Steps before a batch size's first comparison: as soon as a window of them is timed. Waiting longer ran the first
# requests at 64 streams with the slower count for 30 steps of each size (benchmarks/RESULTS.md: a fresh server's
# first 128 requests 20-25% slower than its next ones); a first trial misled by warm-up is undone by the next.
FIRST_TRIAL = WINDOW
# Steps between comparisons: short after a change (it may have been noise), doubling while the count keeps
# winning, so that a settled server spends under 1% of its steps on the other count.
FIRST_PERIOD = 24
MAX_PERIOD = 1536
# A trial whose first steps are each slower than every step of the current window (by the margin) has lost: it ends
# there. Tiny at 64 streams over HTTP took 28.6 ms a step on 2 threads against 18 on 1, and a server's first minutes
# hold several trials.
EARLY_LOSS = 2


@dataclass
class _Bucket:
    current: int  # the thread count these steps run with
    other: int  # the count tried against it
    period: int = FIRST_PERIOD
    until_trial: int = FIRST_TRIAL
    current_times: list[float] = field(default_factory=list)  # the last WINDOW steps with `current`
    trial_times: list[float] = field(default_factory=list)  # the trial under way, with `other`

    @property
    def in_trial(self) -> bool:
        return self.until_trial <= 0


class ThreadTuner:
    """Per decode batch size: all `max_threads`, or one fewer, whichever has been faster lately.

    `threads(batch)` says how many threads the next decode step of `batch` sequences runs with; `record(batch,
    seconds)` reports how long it took. Steps that are not pure decode keep every thread (their length varies
    too much to compare, and a long prefill uses the cores well)."""

    def __init__(self, max_threads: int) -> None:
        if max_threads < 2:
            raise ValueError(f"a thread tuner needs at least 2 threads to choose from, got {max_threads}")
        self.max_threads = max_threads
        self._buckets: dict[int, _Bucket] = {}

    def threads(self, batch: int) -> int:
        bucket = self._bucket(batch)
        return bucket.other if bucket.in_trial else bucket.current

    def record(self, batch: int, seconds: float) -> None:
        bucket = self._bucket(batch)
        if not bucket.in_trial:
            bucket.current_times = [*bucket.current_times[-(WINDOW - 1) :], seconds]
            bucket.until_trial -= 1
            return
        bucket.trial_times.append(seconds)
        lost = len(bucket.trial_times) >= EARLY_LOSS and min(bucket.trial_times) > max(bucket.current_times) * (
            1 + MARGIN
        )
        if len(bucket.trial_times) < WINDOW and not lost:
            return
        trial, current = statistics.median(bucket.trial_times), statistics.median(bucket.current_times)
        if not lost and trial < current * (1 - MARGIN):
            logger.info(
                "decode steps of %d-%d sequences: %d threads (%.2f ms a step against %.2f with %d)",
                *_bounds(batch), bucket.other, 1e3 * trial, 1e3 * current, bucket.current,
            )  # fmt: skip
            bucket.current, bucket.other = bucket.other, bucket.current
            bucket.current_times, bucket.period = bucket.trial_times, FIRST_PERIOD
        else:
            bucket.period = min(2 * bucket.period, MAX_PERIOD)
        bucket.trial_times = []
        bucket.until_trial = bucket.period

    def _bucket(self, batch: int) -> _Bucket:
        key = batch.bit_length()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.max_threads, self.max_threads - 1)
        return bucket


def _bounds(batch: int) -> tuple[int, int]:
    """The batch sizes that share `batch`'s bucket."""
    low = 1 << (batch.bit_length() - 1)
    return low, 2 * low - 1
