"""Per-key quotas and usage: concurrent requests, requests per minute, generated tokens per minute.

Each key (an API key or an AWS access key id, see `gpt2serve.api.auth`) has one `KeyUsage`. A request is
admitted if the key has fewer than `concurrent_requests` in flight, started fewer than
`requests_per_minute` in the last 60 s, and its requests generated fewer than `tokens_per_minute` tokens
in the last 60 s; otherwise `QuotaExceededError` (429) says which quota, its limit and when to retry.
Windows slide: a request counts for 60 s after it started, tokens for 60 s after their generation ended
(so a key may overshoot its token quota by what its requests in flight generate).

The engine charges tokens through `gpt2serve.engine.usage.current_meter`, set here around each request.
`UsageCollector` puts every key's usage on /metrics, labelled by the key's name (never the secret).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, fields

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpt2serve.api.errors import APIError

WINDOW_S = 60.0


@dataclass(frozen=True)
class Quota:
    """Limits of one key; None: no limit."""

    concurrent_requests: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def merged(self, defaults: Quota) -> Quota:
        """This key's own limits, else the server-wide `defaults`."""
        return Quota(**{n: getattr(self, n) if getattr(self, n) is not None else getattr(defaults, n)
                        for n in self.names()})  # fmt: skip


class QuotaExceededError(APIError):
    """429: a key is over one of its quotas; `retry_after_s` is when it will not be."""

    def __init__(self, key: str, quota: str, limit: int, retry_after_s: int):
        what = {"concurrent_requests": "requests in flight", "requests_per_minute": "requests per minute",
                "tokens_per_minute": "generated tokens per minute"}[quota]  # fmt: skip
        message = f"key {key!r} is over its quota of {limit} {what} (`{quota}`); retry in {retry_after_s} s"
        super().__init__(429, message, "rate_limit_error", quota)
        self.retry_after_s = retry_after_s


class KeyUsage:
    """One key's usage; thread-safe (the engine thread charges tokens)."""

    def __init__(self, name: str, quota: Quota, clock=time.monotonic):
        self.name, self.quota, self.clock = name, quota, clock
        self._lock = threading.Lock()
        self.in_flight = 0
        self.requests_total = 0
        self.tokens_total = 0
        self.rejected: dict[str, int] = dict.fromkeys(Quota.names(), 0)
        self._starts: deque[float] = deque()
        self._tokens: deque[tuple[float, int]] = deque()

    def admit(self) -> None:
        """Count a new request in, or raise QuotaExceededError."""
        with self._lock:
            now = self.clock()
            self._expire(now)
            refusal = self._refusal(now)
            if refusal is not None:
                self.rejected[refusal[0]] += 1
                raise QuotaExceededError(self.name, *refusal)
            self.in_flight += 1
            self.requests_total += 1
            self._starts.append(now)

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def charge(self, tokens: int) -> None:
        """Tokens a finished generation made (called from the engine thread)."""
        with self._lock:
            self.tokens_total += tokens
            self._tokens.append((self.clock(), tokens))

    def window(self) -> tuple[int, int]:
        """(requests started, tokens generated) in the last 60 s."""
        with self._lock:
            self._expire(self.clock())
            return len(self._starts), sum(n for _, n in self._tokens)

    def _expire(self, now: float) -> None:
        while self._starts and self._starts[0] <= now - WINDOW_S:
            self._starts.popleft()
        while self._tokens and self._tokens[0][0] <= now - WINDOW_S:
            self._tokens.popleft()

    def _refusal(self, now: float) -> tuple[str, int, int] | None:
        """(quota, limit, seconds to wait) of the first quota a new request would break."""
        q = self.quota
        if q.concurrent_requests is not None and self.in_flight >= q.concurrent_requests:
            return "concurrent_requests", q.concurrent_requests, 1
        if q.requests_per_minute is not None and len(self._starts) >= q.requests_per_minute:
            oldest = self._starts[-q.requests_per_minute]  # the start that must leave the window
            return "requests_per_minute", q.requests_per_minute, _seconds(oldest + WINDOW_S - now)
        if q.tokens_per_minute is not None:
            used = sum(n for _, n in self._tokens)
            if used >= q.tokens_per_minute:
                return "tokens_per_minute", q.tokens_per_minute, self._tokens_wait(now, used)
        return None

    def _tokens_wait(self, now: float, used: int) -> int:
        for at, n in self._tokens:  # oldest first: wait until enough have left the window
            used -= n
            if used < self.quota.tokens_per_minute:
                return _seconds(at + WINDOW_S - now)
        return 1


def _seconds(wait: float) -> int:
    return max(1, math.ceil(wait))


class UsageCollector(Collector):
    """Every key's usage, read when Prometheus scrapes."""

    def __init__(self, usages: dict[str, KeyUsage]):
        self.usages = usages

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "gpt2serve_key_requests", "Requests admitted, by key name.", labels=["key"]
        )
        tokens = CounterMetricFamily(
            "gpt2serve_key_generated_tokens",
            "Tokens generated for finished requests, by key name.",
            labels=["key"],
        )
        rejected = CounterMetricFamily(
            "gpt2serve_key_rejected_requests",
            "Requests refused with 429, by key name and quota.",
            labels=["key", "quota"],
        )
        in_flight = GaugeMetricFamily(
            "gpt2serve_key_in_flight_requests", "Requests in flight.", labels=["key"]
        )
        recent = GaugeMetricFamily(
            "gpt2serve_key_requests_last_minute", "Requests started in the last 60 s.", labels=["key"]
        )
        recent_tokens = GaugeMetricFamily(
            "gpt2serve_key_tokens_last_minute", "Tokens generated in the last 60 s.", labels=["key"]
        )
        for name, usage in self.usages.items():
            started, generated = usage.window()
            requests.add_metric([name], usage.requests_total)
            tokens.add_metric([name], usage.tokens_total)
            in_flight.add_metric([name], usage.in_flight)
            recent.add_metric([name], started)
            recent_tokens.add_metric([name], generated)
            for quota, count in usage.rejected.items():
                rejected.add_metric([name, quota], count)
        yield from (requests, tokens, rejected, in_flight, recent, recent_tokens)
