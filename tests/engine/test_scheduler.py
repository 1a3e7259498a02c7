"""The scheduler with hand-made requests: no model, no torch."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from gpt2serve.engine.errors import EngineOverloadedError, InvalidParameterError
from gpt2serve.engine.scheduler import Scheduler


@dataclass(eq=False)
class Req:
    n_slots: int = 1
    token_cost: int = 10
    slots: list[int] = field(default_factory=list)


def test_admits_while_slots_last():
    s = Scheduler(n_slots=4, max_queue=10, max_total_tokens=1000)
    reqs = [Req(n_slots=2), Req(n_slots=1), Req(n_slots=2)]
    for r in reqs:
        s.add(r)
    assert s.admit() == reqs[:2]
    assert sorted(reqs[0].slots + reqs[1].slots) == [0, 1, 2]
    assert s.slots_in_use == 3 and list(s.waiting) == [reqs[2]]


def test_token_budget_limits_admission():
    s = Scheduler(n_slots=8, max_queue=10, max_total_tokens=100)
    a, b = Req(token_cost=60), Req(token_cost=60)
    s.add(a)
    s.add(b)
    assert s.admit() == [a]
    s.finish(a)
    assert s.admit() == [b]
    assert s.reserved_tokens == 60


def test_retirement_frees_slots_and_tokens():
    s = Scheduler(n_slots=2, max_queue=10, max_total_tokens=100)
    a = Req(n_slots=2, token_cost=40)
    s.add(a)
    s.admit()
    s.release_slot(a, a.slots[0])
    assert s.slots_in_use == 1
    s.finish(a)
    assert s.slots_in_use == 0 and s.reserved_tokens == 0 and not s.running


def test_cancel_while_waiting():
    s = Scheduler(n_slots=1, max_queue=10, max_total_tokens=100)
    a, b = Req(), Req()
    s.add(a)
    s.add(b)
    s.admit()
    s.finish(b)  # cancelled before it ran
    assert not s.waiting
    s.finish(a)
    assert s.admit() == [] and s.slots_in_use == 0


def test_no_starvation_of_an_old_large_request():
    """Small requests arriving after a large one wait behind it, so the large one runs as soon as
    enough slots are free instead of being overtaken forever."""
    s = Scheduler(n_slots=4, max_queue=100, max_total_tokens=10_000)
    running = [Req(n_slots=1) for _ in range(3)]
    for r in running:
        s.add(r)
    s.admit()
    big = Req(n_slots=4)
    s.add(big)
    steps = 0
    for _ in range(10):  # a stream of new small requests; one running request retires per step
        s.add(Req(n_slots=1))
        if running:
            s.finish(running.pop())
        admitted = s.admit()
        steps += 1
        if big in admitted:
            break
        assert all(r.n_slots == 4 for r in admitted)  # nobody jumps the queue
    assert big in s.running and steps == 3


def test_full_queue_refuses_at_once():
    s = Scheduler(n_slots=1, max_queue=2, max_total_tokens=100)
    s.add(Req())
    s.add(Req())
    with pytest.raises(EngineOverloadedError):
        s.add(Req())


def test_request_that_can_never_fit_is_refused():
    s = Scheduler(n_slots=4, max_queue=2, max_total_tokens=100)
    with pytest.raises(InvalidParameterError) as e:
        s.add(Req(n_slots=5))
    assert "5" in str(e.value) and "4" in str(e.value)
    with pytest.raises(InvalidParameterError):
        s.add(Req(token_cost=101))
