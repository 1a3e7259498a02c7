"""Who generated what: a context variable the engine charges each finished generation's tokens to.

The HTTP layer sets `current_meter` (a callable taking a token count) around a caller's request;
`Engine.submit` picks it up in the caller's context and calls it, from the engine thread, with the
tokens of the request's result. Unset (the default), nothing is metered.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

from gpt2serve.engine.request import GenerationResult

Meter = Callable[[int], None]
current_meter: ContextVar[Meter | None] = ContextVar("gpt2serve_current_meter", default=None)


def metered(sink: Callable[[object], None], meter: Meter) -> Callable[[object], None]:
    """`sink` that also charges a GenerationResult's completion tokens to `meter`."""

    def charge_then_sink(item: object) -> None:
        if isinstance(item, GenerationResult):
            meter(item.completion_tokens)
        sink(item)

    return charge_then_sink
