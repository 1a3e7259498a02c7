"""Admission of requests into KV slots: plain Python over request objects, no torch.

Requests wait in a bounded FIFO queue. Between decode steps `admit()` moves the oldest waiting requests
into the running set while free slots and the token budget allow. Admission is strictly first come,
first served: a request that does not fit yet blocks the ones behind it, so a stream of small new
requests cannot starve an old large one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

from gpt2serve.engine.errors import EngineOverloadedError, InvalidParameterError


class Schedulable(Protocol):
    n_slots: int  # KV slots the request needs (beams or samples)
    token_cost: int  # tokens it may hold in the cache: n_slots * (prompt + new tokens)
    slots: list[int]  # assigned on admission
    prompt_ids: list[int]
    active: list  # its sequences still decoding


class Scheduler:
    def __init__(
        self, n_slots: int, max_queue: int, max_total_tokens: int, max_request_slots: int | None = None
    ):
        self.n_slots = n_slots
        self.max_request_slots = n_slots if max_request_slots is None else min(n_slots, max_request_slots)
        self.max_queue = max_queue
        self.max_total_tokens = max_total_tokens
        self.free_slots: list[int] = list(range(n_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self.waiting: deque[Schedulable] = deque()
        self.running: list[Schedulable] = []
        self.reserved_tokens = 0

    def add(self, req: Schedulable) -> None:
        """Queue a request, or refuse it at once when it can never fit or the queue is full."""
        if req.n_slots > self.max_request_slots:
            raise InvalidParameterError(
                "n",
                f"the request needs {req.n_slots} sequences (beams or samples) at once; this server lets one "
                f"request hold at most {self.max_request_slots} of its {self.n_slots} KV slots",
            )
        if req.token_cost > self.max_total_tokens:
            raise InvalidParameterError(
                "max_new_tokens",
                f"the request may hold {req.token_cost} tokens (sequences x (prompt + new tokens)); "
                f"this server's limit is {self.max_total_tokens}",
            )
        if len(self.waiting) >= self.max_queue:
            raise EngineOverloadedError(f"the server is busy: {len(self.waiting)} requests are waiting")
        self.waiting.append(req)

    def admit(self) -> list[Schedulable]:
        """Move waiting requests into running, oldest first, while they fit."""
        admitted = []
        while self.waiting:
            req = self.waiting[0]
            if req.n_slots > len(self.free_slots):
                break
            if self.reserved_tokens + req.token_cost > self.max_total_tokens:
                break
            self.waiting.popleft()
            req.slots = self._take_slots(req.n_slots)
            self.reserved_tokens += req.token_cost
            self.running.append(req)
            admitted.append(req)
        return admitted

    @staticmethod
    def group_prompts(
        decoding: list[Schedulable], admitted: list[Schedulable], fits: Callable[[int], bool]
    ) -> tuple[list[Schedulable], list[list[Schedulable]]]:
        """Which new prompts run in which forward, where `fits(rows)` says whether one pass takes that
        many rows (decode.c's limit): those that fit beside the decode rows join the decode step (one
        pass over the weights for both), the others go in groups that fit, and a prompt too long for it
        alone runs on its own. Returns (joining, groups), oldest first."""
        rows = sum(len(r.active) for r in decoding)
        joining, groups, group_rows = [], [], 0
        for req in admitted:
            n = len(req.prompt_ids)
            if fits(rows + n):
                joining.append(req)
                rows += n
            elif groups and fits(group_rows + n):
                groups[-1].append(req)
                group_rows += n
            else:
                groups.append([req])
                group_rows = n
        return joining, groups

    def _take_slots(self, k: int) -> list[int]:
        """k free slots, consecutive where possible: attention then reads cache views, not gathered copies."""
        free = sorted(self.free_slots)
        start = next((i for i in range(len(free) - k + 1) if free[i + k - 1] - free[i] == k - 1), 0)
        chosen = free[start : start + k]
        taken = set(chosen)
        self.free_slots = [s for s in self.free_slots if s not in taken]
        return chosen

    def release_slot(self, req: Schedulable, slot: int) -> None:
        """Give back one slot of a running request early (a sequence that finished before its siblings)."""
        req.slots.remove(slot)
        self.free_slots.append(slot)

    def finish(self, req: Schedulable) -> None:
        """Remove a request, waiting or running, and free everything it holds."""
        if req in self.running:
            self.running.remove(req)
            self.free_slots.extend(req.slots)
            req.slots = []
            self.reserved_tokens -= req.token_cost
        elif req in self.waiting:
            self.waiting.remove(req)

    @property
    def slots_in_use(self) -> int:
        return self.n_slots - len(self.free_slots)
