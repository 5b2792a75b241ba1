"""Prometheus metrics (`GET /metrics`) and the one log line per finished request.

Each app has its own `CollectorRegistry`, so several servers can live in one process (tests do this).
Gauges read the engine thread's latest stats snapshot at scrape time; counters and histograms are fed by
a `RequestTracker` that watches each request's deltas on the event loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from herd.frontend.async_engine import EngineStats, RequestDelta

logger = logging.getLogger("herd.server.requests")

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60)
_ITL_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 60, 120, 300, 600)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("herd:num_requests_running", "Sequences in the running batch", registry=r).set_function(
            lambda: stats().num_running
        )
        Gauge("herd:num_requests_waiting", "Sequences waiting to be admitted", registry=r).set_function(
            lambda: stats().num_waiting
        )
        Gauge(
            "herd:kv_cache_usage_perc", "Share of the full-attention KV pool held by requests (0-1)", registry=r
        ).set_function(lambda: stats().kv_usage)
        Gauge(
            "herd:kv_cache_evictable_perc",
            "Share of the full-attention KV pool that only the prefix cache holds, reusable on demand (0-1)",
            registry=r,
        ).set_function(lambda: stats().kv_cached_usage)
        r.register(_EngineCounters(stats))
        Gauge(
            "herd:spec_accept_length",
            "Speculative decoding: mean tokens per verify step since start (1 = no draft accepted; 0 = off)",
            registry=r,
        ).set_function(lambda: stats().spec_accept_length)
        self.aborts = Counter(
            "herd:num_aborted_requests", "Requests stopped before they finished (client gone or error)", registry=r
        )
        self.rejected = Counter(
            "herd:num_rejected_requests", "Requests refused with 503 because the queue was full", registry=r
        )
        Gauge("herd:prefix_cache_hit_rate", "Prompt tokens found in the prefix cache (0-1)", registry=r).set_function(
            lambda: stats().prefix_hit_rate
        )
        self.prompt_tokens = Counter("herd:prompt_tokens", "Prefilled prompt tokens", registry=r)
        self.generation_tokens = Counter("herd:generation_tokens", "Generated tokens", registry=r)
        self.finished = Counter("herd:requests_finished", "Finished requests by reason", ["finish_reason"], registry=r)
        self.ttft = Histogram(
            "herd:time_to_first_token_seconds", "Arrival to first token", buckets=_TTFT_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "herd:inter_token_latency_seconds", "Time between a request's steps", buckets=_ITL_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "herd:e2e_request_latency_seconds", "Arrival to last token", buckets=_E2E_BUCKETS, registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self, request_ids: list[str]) -> RequestTracker:
        return RequestTracker(self, request_ids)


class _EngineCounters(Collector):
    """Counters the engine core keeps (its totals since start), read at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "herd:num_preemptions",
            "Sequences preempted to make room in the KV cache (recomputed later)",
            value=self.stats().num_preemptions,
        )
        stats = self.stats()
        yield CounterMetricFamily(
            "herd:spec_verify_ct",
            "Speculative decoding: decode steps of a sequence (verify steps)",
            stats.spec_verify_ct,
        )
        yield CounterMetricFamily(
            "herd:spec_accepted_tokens",
            "Speculative decoding: tokens the verify steps added (accepted drafts + the target's own)",
            stats.spec_accepted_tokens,
        )


@dataclass
class _Progress:
    arrival: float
    first: float | None = None
    last: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    done: bool = False


class RequestTracker:
    """Observes one stream (a `StreamObserver`): metrics per delta, a log line per finished request."""

    def __init__(self, metrics: ServerMetrics, request_ids: list[str]) -> None:
        self.metrics = metrics
        now = time.monotonic()
        self.requests = {request_id: _Progress(arrival=now) for request_id in request_ids}

    def on_delta(self, delta: RequestDelta) -> None:
        now = time.monotonic()
        p = self.requests[delta.request_id]
        new_tokens = sum(len(o.token_ids) for o in delta.outputs)
        if new_tokens:
            if p.first is None:
                p.first = now
                self.metrics.ttft.observe(now - p.arrival)
                self.metrics.prompt_tokens.inc(delta.num_prompt_tokens)
            else:
                self.metrics.itl.observe(now - p.last)
            p.last = now
            self.metrics.generation_tokens.inc(new_tokens)
        p.prompt_tokens, p.cached_tokens = delta.num_prompt_tokens, delta.num_cached_tokens
        p.completion_tokens += new_tokens
        p.finish_reasons += [o.finish_reason for o in delta.outputs if o.finish_reason is not None]
        if delta.finished:
            self._done(delta.request_id, p, now)

    def on_close(self, finished: bool) -> None:
        now = time.monotonic()
        for request_id, p in self.requests.items():
            if not p.done:
                p.finish_reasons.append("abort")
                self._done(request_id, p, now)

    def _done(self, request_id: str, p: _Progress, now: float) -> None:
        if "abort" in p.finish_reasons:
            self.metrics.aborts.inc()
        p.done = True
        reason = "abort" if "abort" in p.finish_reasons else ",".join(sorted(set(p.finish_reasons))) or "abort"
        self.metrics.e2e.observe(now - p.arrival)
        self.metrics.finished.labels(finish_reason=reason).inc()
        ttft = f"{p.first - p.arrival:.3f} s" if p.first is not None else "-"
        logger.info(
            "%s finished (%s): prompt %d tokens (%d cached), completion %d tokens, TTFT %s, total %.3f s",
            request_id,
            reason,
            p.prompt_tokens,
            p.cached_tokens,
            p.completion_tokens,
            ttft,
            now - p.arrival,
        )
