"""Serving-benchmark metric math on synthetic timings with answers worked out by hand."""

from __future__ import annotations

import json

import pytest

from herd.bench.datasets import DatasetRow
from herd.bench.metrics import calculate_metrics, peak_rates
from herd.bench.report import RunInfo, result_block, result_record
from herd.bench.request import RequestOutput, StreamClock


def words(text: str) -> int:
    """A stand-in tokenizer: one token per word."""
    return len(text.split())


def _runs() -> tuple[list[DatasetRow], list[RequestOutput]]:
    rows = [
        DatasetRow("a", text_prompt_len=10, output_len=4),
        DatasetRow("b", text_prompt_len=20, output_len=3, vision_prompt_len=5),
        DatasetRow("c", text_prompt_len=40, output_len=4),
    ]
    outputs = [
        # Server-reported 4 tokens; text chunks at 0.1, 0.3, 0.5, 0.7 s after the start at t=0.
        RequestOutput(
            success=True,
            generated_text="w w w w w",
            latency=0.7,
            ttft=0.1,
            itl=[0.2, 0.2, 0.2],
            text_chunks=["w", "w", "w w"],
            prompt_len=10,
            output_len=4,
            start_time=0.0,
        ),
        # No usage reported: 3 tokens by retokenizing; chunks at 0.8, 0.9, 1.4; ends at 1.5.
        RequestOutput(
            success=True,
            generated_text="x y z",
            latency=1.0,
            ttft=0.3,
            itl=[0.1, 0.5],
            text_chunks=["y", "z"],
            prompt_len=25,
            start_time=0.5,
        ),
        RequestOutput(success=False, error="HTTP 500", prompt_len=40, start_time=0.2),
    ]
    return rows, outputs


def test_metrics_match_hand_computed_values() -> None:
    rows, outputs = _runs()
    m, output_lens = calculate_metrics(rows, outputs, duration_s=2.0, count_tokens=words)

    assert output_lens == [4, 3, 0]  # usage wins over retokenizing; a failure counts 0
    assert (m.completed, m.failed) == (2, 1)
    assert (m.total_input, m.total_input_text, m.total_input_vision) == (35, 30, 5)  # failed row excluded
    assert (m.total_output, m.total_output_retokenized) == (7, 5 + 3)
    assert m.request_throughput == pytest.approx(1.0)
    assert m.input_throughput == pytest.approx(17.5)
    assert m.output_throughput == pytest.approx(3.5)
    assert m.output_throughput_retokenized == pytest.approx(4.0)
    assert m.total_throughput == pytest.approx(21.0)
    # TTFT 100 and 300 ms: numpy's linear P99 is 100 + 0.99 * 200.
    assert (m.mean_ttft_ms, m.median_ttft_ms, m.p99_ttft_ms) == pytest.approx((200, 200, 298))
    assert m.std_ttft_ms == pytest.approx(100)
    # TPOT: (0.7 - 0.1) / 3 = 200 ms and (1.0 - 0.3) / 2 = 350 ms.
    assert (m.mean_tpot_ms, m.median_tpot_ms) == pytest.approx((275, 275))
    assert m.p99_tpot_ms == pytest.approx(200 + 0.99 * 150)
    # ITL pooled: 100, 200, 200, 200, 500 ms; P95 at rank 3.8, P99 at rank 3.96.
    assert (m.mean_itl_ms, m.median_itl_ms, m.max_itl_ms) == pytest.approx((240, 200, 500))
    assert (m.p95_itl_ms, m.p99_itl_ms) == pytest.approx((200 + 0.8 * 300, 200 + 0.96 * 300))
    assert (m.mean_e2e_latency_ms, m.median_e2e_latency_ms) == pytest.approx((850, 850))
    assert m.p99_e2e_latency_ms == pytest.approx(700 + 0.99 * 300)
    assert m.concurrency == pytest.approx(1.7 / 2.0)
    # Second 0 holds all four chunks of the first request and two of the second; both run in 0.5-0.7.
    assert m.max_output_tokens_per_s == 6.0
    assert m.max_concurrent_requests == 2


def test_peak_tokens_bucket_by_second_and_peak_requests_count_overlap() -> None:
    def req(start: float, ttft: float, itl: list[float]) -> RequestOutput:
        return RequestOutput(success=True, start_time=start, ttft=ttft, itl=itl, latency=ttft + sum(itl))

    # Tokens at 10.5, 11.2, 11.4, 11.6 (first request) and 12.1, 12.3 (second); t0 = 10.
    outputs = [req(10.0, 0.5, [0.7, 0.2, 0.2]), req(11.9, 0.2, [0.2]), RequestOutput(start_time=0.0)]
    # Second 1 holds three tokens; the requests (10.0-11.6, 11.9-12.3) never overlap, though both touch second 1.
    assert peak_rates(outputs) == (3.0, 1)
    # Back to back, as at --max-concurrency 1: one ends as the next starts.
    assert peak_rates([req(0.0, 0.125, [0.375]), req(0.5, 0.125, [0.125]), req(0.75, 0.125, [0.125])]) == (5.0, 1)
    assert peak_rates([req(0.0, 0.125, [0.375]), req(0.25, 0.125, [0.125])]) == (4.0, 2)
    assert peak_rates([RequestOutput()]) == (0.0, 0)


def test_tpot_skips_single_token_outputs_and_empty_samples_are_zero() -> None:
    rows = [DatasetRow("a", 5, 1), DatasetRow("b", 5, 1)]
    one = RequestOutput(success=True, generated_text="x", latency=0.4, ttft=0.4, output_len=1)
    m, _ = calculate_metrics(rows, [one, RequestOutput()], 1.0, words)
    assert (m.completed, m.mean_tpot_ms, m.p99_tpot_ms, m.mean_itl_ms) == (1, 0.0, 0.0, 0.0)
    assert m.mean_ttft_ms == pytest.approx(400)

    m, lens = calculate_metrics(rows, [RequestOutput(), RequestOutput()], 1.0, words)
    assert (m.completed, m.failed, m.total_output, lens) == (0, 2, 0, [0, 0])
    assert (m.mean_e2e_latency_ms, m.max_itl_ms, m.max_output_tokens_per_s) == (0.0, 0.0, 0.0)


def test_itl_per_token_spreads_a_chunk_gap_over_its_tokens() -> None:
    out = RequestOutput(
        success=True,
        generated_text="a b c d",
        latency=0.5,
        ttft=0.1,
        itl=[0.3, 0.1],
        text_chunks=["b c d", ""],  # an empty chunk still counts as one gap
        output_len=4,
    )
    m, _ = calculate_metrics([DatasetRow("p", 3, 4)], [out], 1.0, words, itl_per_token=True)
    # ITLs: 100, 100, 100 (300 ms over three tokens) and 100 ms.
    assert (m.mean_itl_ms, m.max_itl_ms, m.std_itl_ms) == pytest.approx((100, 100, 0))


def test_stream_clock_times_first_text_and_gaps() -> None:
    out = RequestOutput()
    clock = StreamClock(out)
    t0 = out.start_time
    clock.text("", t0 + 0.05)  # role-only or usage-only chunks carry no text and are not timed
    clock.text("Hel", t0 + 0.1)
    clock.text("lo", t0 + 0.25)
    clock.text(" wor ld", t0 + 0.45, new_tokens=2)  # a server that counts tokens per chunk
    clock.finish()
    assert out.ttft == pytest.approx(0.1)
    assert out.itl == pytest.approx([0.15, 0.1, 0.1])
    assert out.generated_text == "Hello wor ld" and out.success
    assert out.latency >= 0.0

    empty = RequestOutput()
    clock = StreamClock(empty)
    clock.finish()
    assert empty.ttft == empty.latency  # a reply with no streamed text: its first text came at the end


def test_result_block_has_sglang_labels_and_layout() -> None:
    rows, outputs = _runs()
    m, _ = calculate_metrics(rows, outputs, 2.0, words)
    info = RunInfo("sglang-oai", float("inf"), 4, 2.0, accept_length=2.5, show_vision=True)
    lines = result_block(m, info).splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============"
    assert lines[-1] == "=" * 50
    assert f"{'Successful requests:':<40} {2:<10}" in lines
    assert f"{'Traffic request rate:':<40} {'inf':<10}" in lines
    assert f"{'Benchmark duration (s):':<40} {'2.00':<10}" in lines
    assert f"{'Accept length:':<40} {'2.50':<10}" in lines
    assert "-----Time per Output Token (excl. 1st token)------" in lines
    assert "----------------End-to-End Latency----------------" in lines
    labels = [line.split(":")[0] for line in lines if ":" in line]
    assert labels == [
        "Backend",
        "Traffic request rate",
        "Max request concurrency",
        "Successful requests",
        "Benchmark duration (s)",
        "Total input tokens",
        "Total input text tokens",
        "Total input vision tokens",
        "Total generated tokens",
        "Total generated tokens (retokenized)",
        "Request throughput (req/s)",
        "Input token throughput (tok/s)",
        "Output token throughput (tok/s)",
        "Peak output token throughput (tok/s)",
        "Peak concurrent requests",
        "Total token throughput (tok/s)",
        "Concurrency",
        "Accept length",
        "Mean E2E Latency (ms)",
        "Median E2E Latency (ms)",
        "Mean TTFT (ms)",
        "Median TTFT (ms)",
        "P99 TTFT (ms)",
        "Mean TPOT (ms)",
        "Median TPOT (ms)",
        "P99 TPOT (ms)",
        "Mean ITL (ms)",
        "Median ITL (ms)",
        "P95 ITL (ms)",
        "P99 ITL (ms)",
        "Max ITL (ms)",
    ]
    plain = result_block(m, RunInfo("vllm", 4.0, None, 2.0)).splitlines()
    assert f"{'Max request concurrency:':<40} {'not set':<10}" in plain
    assert not any(line.startswith(("Accept length", "Total input text")) for line in plain)


def test_result_record_is_json_with_metrics_and_details() -> None:
    rows, outputs = _runs()
    m, lens = calculate_metrics(rows, outputs, 2.0, words)
    info = RunInfo("sglang-oai", float("inf"), None, 2.0)
    record = json.loads(json.dumps(result_record(m, info, {"tag": "t"}, outputs, lens)))
    assert record["request_rate"] == "inf" and record["tag"] == "t"
    assert record["completed"] == 2 and record["total_output_tokens"] == 7
    assert record["total_input_vision_tokens"] == 5 and record["p99_itl_ms"] == pytest.approx(488)
    assert record["output_lens"] == [4, 3, 0] and record["errors"] == ["", "", "HTTP 500"]
    assert len(record["itls"]) == len(record["ttfts"]) == len(record["generated_texts"]) == 3
