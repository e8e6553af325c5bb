"""Prometheus metrics of the server (`GET /metrics`), on a registry of the app's own.

Per request: `llamaduo_requests_total{model,status}`, `llamaduo_request_latency_seconds{model}`,
`llamaduo_time_to_first_token_seconds{model}` (the server sends a request's text in one chunk once
it is generated, so this is the time until the answer is ready), `llamaduo_tokens_in_total` /
`llamaduo_tokens_out_total{model}`, `llamaduo_fallbacks_total{reason}`. Read at scrape time from
their owners: the batcher's `llamaduo_batch_size` (count = batches, sum = requests batched), its prefix cache's
`llamaduo_prefix_cache_lookups_total`, `_hits_total`, `_reused_tokens_total` (prompt tokens not
prefilled again) and `llamaduo_prefix_cache_bytes`, the
shadow sender's `llamaduo_shadow_requests_total{outcome}` (sent, judged, unjudged, failed) and
`llamaduo_shadow_dropped_total{reason}`, the last window's `llamaduo_shadow_score` and its CI,
`llamaduo_drifted`, and `llamaduo_shadow_spend_usd`. A per-app `CollectorRegistry` keeps two
apps in one process (the tests) from sharing series.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def fallback_reason(reason: str) -> str:
    """A fallback's label: drift, latency (over the budget) or error."""
    if reason.startswith("drift"):
        return "drift"
    return "latency" if "latency budget" in reason else "error"


class ServeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("llamaduo_requests", "Chat-completion requests by served model and HTTP status.",
                                ["model", "status"], registry=r)
        self.latency = Histogram("llamaduo_request_latency_seconds", "Request latency, body in to answer out.",
                                 ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("llamaduo_time_to_first_token_seconds", "Time until the first answer token is ready.",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens_in = Counter("llamaduo_tokens_in", "Prompt tokens of answered requests.", ["model"], registry=r)
        self.tokens_out = Counter("llamaduo_tokens_out", "Completion tokens of answered requests.", ["model"], registry=r)
        self.fallbacks = Counter("llamaduo_fallbacks", "Requests answered by the service LLM, by reason.",
                                 ["reason"], registry=r)
        self.in_flight = 0  # chat-completion requests being answered now (the event loop's count)
        Gauge("llamaduo_requests_in_flight", "Chat-completion requests being answered.",
              registry=r).set_function(lambda: self.in_flight)

    def busy(self) -> bool:
        return self.in_flight > 0

    def watch(self, batcher: Any = None, shadows: dict[str, Any] | None = None,
              drifts: dict[str, Any] | None = None) -> None:
        """Series read from their owners at scrape time (shadow senders and drift monitors by served model)."""
        self.registry.register(_Owned(batcher, shadows or {}, drifts or {}))

    def answered(self, model: str, choices: list[Any], ttft_s: float) -> None:
        self.ttft.labels(model).observe(ttft_s)
        self.counted(model, choices)

    def counted(self, model: str, choices: list[Any]) -> None:
        """The tokens of a finished answer (a streamed one's first token was observed when it went out)."""
        self.tokens_in.labels(model).inc(max((getattr(c, "prompt_tokens", 0) for c in choices), default=0))
        self.tokens_out.labels(model).inc(sum(getattr(c, "completion_tokens", 0) for c in choices))

    def fallback(self, reason: str) -> None:
        self.fallbacks.labels(fallback_reason(reason)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Owned(Collector):
    """Series read from their owners at scrape time; shadow and drift series carry the served model
    they watch (`model`), since each served run has its own monitoring."""

    def __init__(self, batcher: Any, shadows: dict[str, Any], drifts: dict[str, Any]):
        self.batcher, self.shadows, self.drifts = batcher, shadows, drifts  # by served model name

    def collect(self) -> Iterator[Any]:
        if self.batcher is not None:
            st = self.batcher.stats
            yield SummaryMetricFamily("llamaduo_batch_size", "Requests per generate batch.",
                                      count_value=st.batches, sum_value=st.requests)
            prefixes = getattr(getattr(self.batcher, "batch", None), "prefixes", None)
            if prefixes is not None and prefixes.budget > 0:  # absent when there is no cache (off, or batched `generate`)
                for name, doc, value in (
                        ("lookups", "Prompts looked up in the prefix cache.", prefixes.lookups),
                        ("hits", "Prompts that took a prefix from the cache.", prefixes.hits),
                        ("reused_tokens", "Prompt tokens taken from the cache, not prefilled.", prefixes.reused_tokens)):
                    yield CounterMetricFamily(f"llamaduo_prefix_cache_{name}", doc, value=value)
                yield GaugeMetricFamily("llamaduo_prefix_cache_bytes", "Bytes the prefix cache holds.", value=prefixes.bytes)
        if self.shadows:
            sent = CounterMetricFamily("llamaduo_shadow_requests", "Shadowed requests by outcome.",
                                       labels=["model", "outcome"])
            dropped = CounterMetricFamily("llamaduo_shadow_dropped", "Shadow work dropped, by reason.",
                                          labels=["model", "reason"])
            spend = GaugeMetricFamily("llamaduo_shadow_spend_usd", "USD spent on shadow answers and judging.",
                                      labels=["model"])
            queue = GaugeMetricFamily("llamaduo_shadow_queue", "Shadow work waiting.", labels=["model"])
            for model, sh in self.shadows.items():
                for outcome in ("sampled", "sent", "judged", "unjudged", "failed"):
                    sent.add_metric([model, outcome], sh.counts.get(outcome, 0))
                for reason in ("queue_full", "budget"):
                    dropped.add_metric([model, reason], sh.dropped().get(reason, 0))
                spend.add_metric([model], sh.spend_usd)
                queue.add_metric([model], sh.queue.qsize())
            yield from (sent, dropped, spend, queue)
        if self.drifts:
            score = GaugeMetricFamily("llamaduo_shadow_score", "The last monitoring window's score.", labels=["model"])
            low = GaugeMetricFamily("llamaduo_shadow_score_ci_low", "Its 95 % CI, lower bound.", labels=["model"])
            high = GaugeMetricFamily("llamaduo_shadow_score_ci_high", "Its 95 % CI, upper bound.", labels=["model"])
            target = GaugeMetricFamily("llamaduo_shadow_target", "The run's target for the score.", labels=["model"])
            drifted = GaugeMetricFamily("llamaduo_drifted", "1 while live traffic is judged below target.",
                                        labels=["model"])
            scored = False
            for model, d in self.drifts.items():
                last = d.last
                # No window yet: the series is absent (n/a), never a 0 that reads as a failing score.
                if last is not None and last.value is not None:
                    scored = True
                    score.add_metric([model], last.value)
                    if last.ci_low is not None:
                        low.add_metric([model], last.ci_low)
                        high.add_metric([model], last.ci_high)
                target.add_metric([model], d.target)
                drifted.add_metric([model], float(d.drifted))
            yield from ((score, low, high) if scored else ())
            yield from (target, drifted)


class MetricsMiddleware:
    """Pure ASGI middleware counting chat-completion requests by model and status, with latency.

    The model label is the served model, or the service's when the answer came from it."""

    def __init__(self, app: Any, metrics: ServeMetrics, model: str, service_model: str = "service"):
        self.app, self.metrics, self.model, self.service_model = app, metrics, model, service_model

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("path") != "/v1/chat/completions":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        seen: dict[str, Any] = {"status": 500, "model": self.model}

        async def wrapped(message: dict) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                for k, v in message.get("headers", []):
                    if k == b"x-llamaduo-served-by" and v == b"service":
                        seen["model"] = self.service_model
            await send(message)

        self.metrics.in_flight += 1
        try:
            await self.app(scope, receive, wrapped)
        finally:
            self.metrics.in_flight -= 1
            self.metrics.requests.labels(seen["model"], str(seen["status"])).inc()
            self.metrics.latency.labels(seen["model"]).observe(time.perf_counter() - t0)
