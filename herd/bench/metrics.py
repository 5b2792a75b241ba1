"""Serving metrics from timed requests, with SGLang bench_serving's definitions.

- TTFT: send -> first generated text; E2E latency: send -> end of reply.
- TPOT: (E2E - TTFT) / (output tokens - 1), for requests with more than one output token.
- ITL: every gap between streamed text chunks, pooled over requests.
- Output tokens: the server's usage.completion_tokens when it reports them, else the retokenized text.
- Throughputs divide totals over successful requests by the benchmark's wall time; concurrency is the sum
  of E2E latencies over that time.
- Peak output throughput: the busiest one-second bucket, counting one token per text chunk. Peak concurrent
  requests: the most requests in flight at one instant (SGLang counts every request whose lifetime touches
  a one-second bucket, which reads 2-3 for back-to-back requests at a concurrency of 1).
Means, medians, standard deviations (population) and percentiles (linear) are numpy's; an empty sample
gives 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from herd.bench.datasets import DatasetRow
from herd.bench.request import RequestOutput


@dataclass(frozen=True)
class BenchmarkMetrics:
    completed: int
    failed: int
    total_input: int
    total_input_text: int
    total_input_vision: int
    total_output: int
    total_output_retokenized: int
    request_throughput: float
    input_throughput: float
    output_throughput: float
    output_throughput_retokenized: float
    total_throughput: float
    total_throughput_retokenized: float
    mean_ttft_ms: float
    median_ttft_ms: float
    std_ttft_ms: float
    p99_ttft_ms: float
    mean_tpot_ms: float
    median_tpot_ms: float
    std_tpot_ms: float
    p99_tpot_ms: float
    mean_itl_ms: float
    median_itl_ms: float
    std_itl_ms: float
    p95_itl_ms: float
    p99_itl_ms: float
    max_itl_ms: float
    mean_e2e_latency_ms: float
    median_e2e_latency_ms: float
    std_e2e_latency_ms: float
    p99_e2e_latency_ms: float
    concurrency: float
    max_output_tokens_per_s: float
    max_concurrent_requests: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _ms_stats(values: Sequence[float], percentiles: Sequence[int]) -> dict[str, float]:
    """mean / median / std / pNN / max of seconds, in milliseconds; all 0 for an empty sample."""
    if not values:
        return {"mean": 0.0, "median": 0.0, "std": 0.0, "max": 0.0} | {f"p{p}": 0.0 for p in percentiles}
    a = np.asarray(values, dtype=np.float64) * 1000.0
    stats = {"mean": float(a.mean()), "median": float(np.median(a)), "std": float(a.std()), "max": float(a.max())}
    return stats | {f"p{p}": float(np.percentile(a, p)) for p in percentiles}


def peak_rates(outputs: Sequence[RequestOutput]) -> tuple[float, int]:
    """(peak output tokens per second over one-second buckets from the first successful request's start,
    peak requests in flight at one instant)."""
    done = [o for o in outputs if o.success]
    if not done:
        return 0.0, 0
    t0 = min(o.start_time for o in done)
    n_buckets = math.ceil(max(o.start_time + o.latency for o in done) - t0) + 1
    tokens = np.zeros(n_buckets)
    for o in done:
        t = o.start_time + o.ttft
        times = [t]
        for gap in o.itl:
            t += gap
            times.append(t)
        for when in times:
            bucket = int(when - t0)
            if 0 <= bucket < n_buckets:
                tokens[bucket] += 1
    return float(tokens.max()), _peak_in_flight(done)


def _peak_in_flight(outputs: Sequence[RequestOutput]) -> int:
    # Ends sort before starts at the same instant: a request sent as the previous one ends is not overlap.
    events = sorted([(o.start_time, 1) for o in outputs] + [(o.start_time + o.latency, -1) for o in outputs])
    in_flight = peak = 0
    for _, change in events:
        in_flight += change
        peak = max(peak, in_flight)
    return peak


def _itls(out: RequestOutput, count_tokens: Callable[[str], int] | None) -> list[float]:
    if count_tokens is None:
        return list(out.itl)
    # Speculative decoding streams several tokens per chunk: spread each gap over its chunk's tokens.
    spread: list[float] = []
    for gap, text in zip(out.itl, out.text_chunks, strict=False):
        n = max(count_tokens(text), 1)
        spread.extend([gap / n] * n)
    return spread


def calculate_metrics(
    rows: Sequence[DatasetRow],
    outputs: Sequence[RequestOutput],
    duration_s: float,
    count_tokens: Callable[[str], int],
    itl_per_token: bool = False,
) -> tuple[BenchmarkMetrics, list[int]]:
    """Metrics of a run and each request's output token count (0 for a failed one). rows[i] is the request
    that produced outputs[i]. itl_per_token spreads each ITL over the retokenized tokens of its chunk."""
    output_lens, retokenized = [], []
    ttfts, tpots, itls, e2es = [], [], [], []
    total_text = total_vision = 0
    for row, out in zip(rows, outputs, strict=True):
        if not out.success:
            output_lens.append(0)
            retokenized.append(0)
            continue
        n_retok = count_tokens(out.generated_text)
        n_out = out.output_len if out.output_len is not None else n_retok
        output_lens.append(n_out)
        retokenized.append(n_retok)
        total_text += row.text_prompt_len
        total_vision += row.vision_prompt_len
        if n_out > 1:
            tpots.append((out.latency - out.ttft) / (n_out - 1))
        itls += _itls(out, count_tokens if itl_per_token else None)
        ttfts.append(out.ttft)
        e2es.append(out.latency)
    completed = len(e2es)
    total_input, total_output, total_retok = total_text + total_vision, sum(output_lens), sum(retokenized)
    ttft, tpot = _ms_stats(ttfts, (99,)), _ms_stats(tpots, (99,))
    itl, e2e = _ms_stats(itls, (95, 99)), _ms_stats(e2es, (99,))
    peak_tokens, peak_requests = peak_rates(outputs)
    metrics = BenchmarkMetrics(
        completed=completed,
        failed=len(outputs) - completed,
        total_input=total_input,
        total_input_text=total_text,
        total_input_vision=total_vision,
        total_output=total_output,
        total_output_retokenized=total_retok,
        request_throughput=completed / duration_s,
        input_throughput=total_input / duration_s,
        output_throughput=total_output / duration_s,
        output_throughput_retokenized=total_retok / duration_s,
        total_throughput=(total_input + total_output) / duration_s,
        total_throughput_retokenized=(total_input + total_retok) / duration_s,
        mean_ttft_ms=ttft["mean"],
        median_ttft_ms=ttft["median"],
        std_ttft_ms=ttft["std"],
        p99_ttft_ms=ttft["p99"],
        mean_tpot_ms=tpot["mean"],
        median_tpot_ms=tpot["median"],
        std_tpot_ms=tpot["std"],
        p99_tpot_ms=tpot["p99"],
        mean_itl_ms=itl["mean"],
        median_itl_ms=itl["median"],
        std_itl_ms=itl["std"],
        p95_itl_ms=itl["p95"],
        p99_itl_ms=itl["p99"],
        max_itl_ms=itl["max"],
        mean_e2e_latency_ms=e2e["mean"],
        median_e2e_latency_ms=e2e["median"],
        std_e2e_latency_ms=e2e["std"],
        p99_e2e_latency_ms=e2e["p99"],
        concurrency=sum(e2es) / duration_s,
        max_output_tokens_per_s=peak_tokens,
        max_concurrent_requests=peak_requests,
    )
    return metrics, output_lens
