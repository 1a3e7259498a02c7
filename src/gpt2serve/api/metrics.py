"""Prometheus metrics of one server: HTTP requests, and the engine's counters read at scrape time.

Each app has its own registry (never prometheus_client's global one), so several apps can live in one
process. `GET /metrics` (see `gpt2serve.api.routes.metrics`) answers it in the Prometheus text format.

- `gpt2serve_http_requests_total{method, route, status}` and `gpt2serve_http_request_duration_seconds
  {method, route}`: recorded by `RequestContextMiddleware` when an answer ends (for a stream: when the
  stream ends). `route` is the route's path template (`/endpoints/{endpoint_name}/invocations`), or
  `unmatched`, so the label set stays small. Status 499: the client left before its answer.
- `gpt2serve_engine_*` and `gpt2serve_ready`: read from `Engine.stats` and the scheduler on each scrape;
  absent while the model loads.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpt2serve.api.state import ServerState

# A generation takes from milliseconds (tiny models, short answers) to minutes (batch transform).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
UNMATCHED = "unmatched"

# EngineStats field -> (metric name, help) of the engine's counters.
ENGINE_COUNTERS = {
    "steps": ("gpt2serve_engine_decode_steps", "Decode steps run (each advances every running sequence)."),
    "decoded_tokens": ("gpt2serve_engine_decoded_tokens", "Tokens made by decode steps."),
    "prefills": ("gpt2serve_engine_prefills", "Prompts prefilled."),
    "prefill_tokens": ("gpt2serve_engine_prefill_tokens", "Prompt tokens prefilled."),
    "prefills_in_step": ("gpt2serve_engine_prefills_in_step", "Prompts prefilled inside a decode step."),
}
OUTCOMES = {"finished": "requests_finished", "failed": "requests_failed", "cancelled": "requests_cancelled"}


class EngineCollector(Collector):
    """The engine's counters and gauges, read when Prometheus scrapes."""

    def __init__(self, state: ServerState):
        self.state = state

    def collect(self) -> Iterator[Metric]:
        ready = int(self.state.ready)
        yield GaugeMetricFamily("gpt2serve_ready", "1 once the model serves, else 0.", value=ready)
        engine = self.state.engine
        if engine is None:
            return
        stats, scheduler = engine.stats, engine.scheduler
        for field, (name, doc) in ENGINE_COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=getattr(stats, field))
        requests = CounterMetricFamily(
            "gpt2serve_engine_requests", "Engine requests ended, by outcome.", labels=["outcome"]
        )
        for outcome, field in OUTCOMES.items():
            requests.add_metric([outcome], getattr(stats, field))
        yield requests
        gauges = {
            "max_step_batch": ("The most sequences one decode step has run.", stats.max_step_batch),
            "slots": ("KV cache slots (sequences that can run at once).", scheduler.n_slots),
            "slots_in_use": ("KV cache slots held by running sequences.", scheduler.slots_in_use),
            "queue_depth": ("Requests waiting for slots.", len(scheduler.waiting)),
            "running_requests": ("Requests being generated.", len(scheduler.running)),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"gpt2serve_engine_{name}", doc, value=value)


class ServerMetrics:
    """One app's registry: the HTTP request metrics and the engine collector."""

    def __init__(self, state: ServerState):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gpt2serve_http_requests", "HTTP requests answered, by route and status.",
            ["method", "route", "status"], registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "gpt2serve_http_request_duration_seconds", "Time from a request's arrival to its answer's end.",
            ["method", "route"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.registry.register(EngineCollector(state))

    def observe(self, method: str, route: str | None, status: int, seconds: float) -> None:
        """Record one answered request (called by the middleware)."""
        route = route or UNMATCHED
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)
