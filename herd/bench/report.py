"""SGLang's "Serving Benchmark Result" block and the JSONL record of a run.

The block keeps SGLang's labels, order and column layout (a 40-character label, a 10-character value) so
that scripts written against `sglang.bench_serving` output read herd's too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from herd.bench.metrics import BenchmarkMetrics
from herd.bench.request import RequestOutput

WIDTH = 50


@dataclass(frozen=True)
class RunInfo:
    """What the block says about how the run was driven."""

    backend: str
    request_rate: float
    max_concurrency: int | None
    duration_s: float
    accept_length: float | None = None
    show_vision: bool = False  # the text / vision split of input tokens (image datasets)


def _line(label: str, value: object, fmt: str = "") -> str:
    return f"{label:<40} {value:<10{fmt}}"


def _title(text: str, fill: str) -> str:
    return f"{text:{fill}^{WIDTH}}"


def result_block(m: BenchmarkMetrics, run: RunInfo) -> str:
    """The printed result block, without a leading blank line."""
    f2 = ".2f"
    lines = [
        _title(" Serving Benchmark Result ", "="),
        _line("Backend:", run.backend),
        _line("Traffic request rate:", run.request_rate),
        _line("Max request concurrency:", run.max_concurrency if run.max_concurrency else "not set"),
        _line("Successful requests:", m.completed),
        _line("Benchmark duration (s):", run.duration_s, f2),
        _line("Total input tokens:", m.total_input),
    ]
    if run.show_vision:
        lines += [
            _line("Total input text tokens:", m.total_input_text),
            _line("Total input vision tokens:", m.total_input_vision),
        ]
    lines += [
        _line("Total generated tokens:", m.total_output),
        _line("Total generated tokens (retokenized):", m.total_output_retokenized),
        _line("Request throughput (req/s):", m.request_throughput, f2),
        _line("Input token throughput (tok/s):", m.input_throughput, f2),
        _line("Output token throughput (tok/s):", m.output_throughput, f2),
        _line("Peak output token throughput (tok/s):", m.max_output_tokens_per_s, f2),
        _line("Peak concurrent requests:", m.max_concurrent_requests),
        _line("Total token throughput (tok/s):", m.total_throughput, f2),
        _line("Concurrency:", m.concurrency, f2),
    ]
    if run.accept_length:
        lines.append(_line("Accept length:", run.accept_length, f2))
    lines += [
        _title("End-to-End Latency", "-"),
        _line("Mean E2E Latency (ms):", m.mean_e2e_latency_ms, f2),
        _line("Median E2E Latency (ms):", m.median_e2e_latency_ms, f2),
        _title("Time to First Token", "-"),
        _line("Mean TTFT (ms):", m.mean_ttft_ms, f2),
        _line("Median TTFT (ms):", m.median_ttft_ms, f2),
        _line("P99 TTFT (ms):", m.p99_ttft_ms, f2),
        _title("Time per Output Token (excl. 1st token)", "-"),
        _line("Mean TPOT (ms):", m.mean_tpot_ms, f2),
        _line("Median TPOT (ms):", m.median_tpot_ms, f2),
        _line("P99 TPOT (ms):", m.p99_tpot_ms, f2),
        _title("Inter-Token Latency", "-"),
        _line("Mean ITL (ms):", m.mean_itl_ms, f2),
        _line("Median ITL (ms):", m.median_itl_ms, f2),
        _line("P95 ITL (ms):", m.p95_itl_ms, f2),
        _line("P99 ITL (ms):", m.p99_itl_ms, f2),
        _line("Max ITL (ms):", m.max_itl_ms, f2),
        "=" * WIDTH,
    ]
    return "\n".join(lines)


def result_record(
    m: BenchmarkMetrics,
    run: RunInfo,
    settings: dict[str, Any],
    outputs: Sequence[RequestOutput],
    output_lens: Sequence[int],
    server_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One JSONL line: the run's settings, every metric under SGLang's key names, and per-request details."""
    rate = run.request_rate if run.request_rate != float("inf") else "inf"  # JSON has no Infinity
    record: dict[str, Any] = {**settings, "request_rate": rate, "max_concurrency": run.max_concurrency}
    record["server_info"] = server_info
    record["duration"] = run.duration_s
    metrics = m.as_dict()
    metrics["total_input_tokens"] = metrics.pop("total_input")
    metrics["total_input_text_tokens"] = metrics.pop("total_input_text")
    metrics["total_input_vision_tokens"] = metrics.pop("total_input_vision")
    metrics["total_output_tokens"] = metrics.pop("total_output")
    metrics["total_output_tokens_retokenized"] = metrics.pop("total_output_retokenized")
    record |= metrics
    record["accept_length"] = run.accept_length
    record |= {
        "input_lens": [o.prompt_len for o in outputs],
        "output_lens": list(output_lens),
        "ttfts": [o.ttft for o in outputs],
        "itls": [o.itl for o in outputs],
        "latencies": [o.latency for o in outputs],
        "generated_texts": [o.generated_text for o in outputs],
        "errors": [o.error for o in outputs],
    }
    return record


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    with Path(path).open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
