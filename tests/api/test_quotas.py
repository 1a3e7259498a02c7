"""Per-key quotas with a hand-driven clock: the sliding 60 s windows, concurrency, Retry-After."""

from __future__ import annotations

import pytest

from gpt2serve.api.quotas import KeyUsage, Quota, QuotaExceededError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refused(usage: KeyUsage) -> QuotaExceededError:
    with pytest.raises(QuotaExceededError) as info:
        usage.admit()
    return info.value


def test_requests_per_minute_slide_and_say_when_to_retry() -> None:
    clock = Clock()
    usage = KeyUsage("k", Quota(requests_per_minute=3), clock)
    for dt in (0, 10, 20):
        clock.now += dt
        usage.admit()
        usage.release()
    clock.now += 5  # starts at 1000, 1010, 1030; now 1035: the first leaves the window at 1060
    error = refused(usage)
    assert (error.status, error.param, error.retry_after_s) == (429, "requests_per_minute", 25)
    clock.now = 1060.0
    usage.admit()
    assert usage.window() == (3, 0) and usage.rejected["requests_per_minute"] == 1


def test_concurrent_requests_free_up_on_release() -> None:
    usage = KeyUsage("k", Quota(concurrent_requests=2), Clock())
    usage.admit()
    usage.admit()
    assert refused(usage).param == "concurrent_requests"
    usage.release()
    usage.admit()
    assert usage.in_flight == 2 and usage.requests_total == 3


def test_tokens_per_minute_wait_until_enough_tokens_leave_the_window() -> None:
    clock = Clock()
    usage = KeyUsage("k", Quota(tokens_per_minute=100), clock)
    usage.charge(60)
    clock.now += 30
    usage.charge(50)  # 110 in the window: the 60 at t=1000 must leave (at 1060)
    error = refused(usage)
    assert (error.param, error.retry_after_s) == ("tokens_per_minute", 30)
    assert "100 generated tokens per minute" in error.message
    clock.now += 30
    usage.admit()
    assert usage.window() == (1, 50) and usage.tokens_total == 110


def test_no_quota_no_limit_and_defaults_fill_the_gaps() -> None:
    usage = KeyUsage("k", Quota(), Clock())
    for _ in range(1000):
        usage.admit()
    own = Quota(requests_per_minute=5).merged(Quota(requests_per_minute=1, tokens_per_minute=9))
    assert own == Quota(None, 5, 9)
