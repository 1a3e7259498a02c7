"""One poisoned request fails alone: the requests decoding beside it finish token for token as if it had
never joined (seeded sampling, so any disturbance of their generators or their cache would show).

Three poisons are injected into the engine's own code paths, each keyed to a marker value the poisoned
request alone carries: the token choice raises, the logits turn NaN before the draw, and the forward
pass that the poisoned prompt joins raises.
"""

from __future__ import annotations

import queue
import time

import pytest

from gpt2serve.engine import processors, sampling_fast
from gpt2serve.engine.config import EngineConfig
from gpt2serve.engine.engine import Engine
from gpt2serve.engine.errors import NonFiniteLogitsError
from gpt2serve.engine.params import SamplingParams
from gpt2serve.engine.request import GenerationResult

GOOD = [SamplingParams(do_sample=True, top_k=40 if i % 2 else 0, top_p=0.9, seed=i, max_new_tokens=40)
        for i in range(4)]  # fmt: skip
PROMPTS = ["The cat sat", "Once upon a time", "In the year 2000", "A B C"]
POISON_TEMPERATURE = 0.777  # valid, but the injected token choice raises for it
POISON_PENALTY = 1.2345  # valid, but the injected processor turns its row NaN
POISON_PROMPT = "zebra quagga okapi"  # its tokens make the injected forward raise


class InjectedFault(RuntimeError):
    pass


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    engine = Engine.load(str(tiny_checkpoint), EngineConfig(max_batch_size=16, cpu_kernels="auto"))
    engine.start()
    yield engine
    engine.stop()


def _texts(results: list[GenerationResult]) -> list[list[int]]:
    return [[o.token_ids for o in r.outputs] for r in results]


def _run(engine: Engine, poison: SamplingParams | None, poison_prompt: str = "poisoned") -> tuple:
    """The four good requests; with `poison`, a fifth joins once they are decoding."""
    sinks = [queue.Queue() for _ in GOOD]
    for prompt, params, sink in zip(PROMPTS, GOOD, sinks):
        engine.submit(prompt, params, sink.put, stream=False)
    poisoned = None
    if poison is not None:
        start = engine.stats.steps
        deadline = time.monotonic() + 30
        while engine.stats.steps < start + 3 and time.monotonic() < deadline:  # they are decoding
            time.sleep(0.001)
        poisoned = queue.Queue()
        engine.submit(poison_prompt, poison, poisoned.put, stream=False)
    results = [sink.get(timeout=60) for sink in sinks]
    return results, (None if poisoned is None else poisoned.get(timeout=60))


def test_a_raising_token_choice_fails_only_its_request(engine, monkeypatch):
    clean, _ = _run(engine, None)
    original = sampling_fast.draw_top_k
    seen = {"poisoned": 0}

    def draw_top_k(x, params, generators):
        if any(p.temperature == POISON_TEMPERATURE for p in params):
            seen["poisoned"] += 1
            if seen["poisoned"] >= 3:  # its first tokens are fine: it fails inside the shared step
                raise InjectedFault("poisoned row")
        return original(x, params, generators)

    monkeypatch.setattr(sampling_fast, "draw_top_k", draw_top_k)
    poison = SamplingParams(
        do_sample=True, temperature=POISON_TEMPERATURE, top_k=20, seed=9, max_new_tokens=30
    )
    results, failed = _run(engine, poison)
    assert isinstance(failed, InjectedFault) and seen["poisoned"] >= 3
    assert all(isinstance(r, GenerationResult) for r in results)
    assert _texts(results) == _texts(clean)


def test_a_nan_row_is_caught_before_the_draw(engine, monkeypatch):
    clean, _ = _run(engine, None)
    original = processors.apply_repetition_penalty
    seen = {"poisoned": 0}

    def penalty(x, histories, penalties):
        out = original(x, histories, penalties)
        for i, p in enumerate(penalties):
            if p == POISON_PENALTY:
                seen["poisoned"] += 1
                if seen["poisoned"] >= 3:
                    out[i] = float("nan")
        return out

    monkeypatch.setattr(processors, "apply_repetition_penalty", penalty)
    poison = SamplingParams(do_sample=True, repetition_penalty=POISON_PENALTY, seed=5, max_new_tokens=30)
    results, failed = _run(engine, poison)
    assert isinstance(failed, NonFiniteLogitsError)
    assert _texts(results) == _texts(clean)


def test_a_failing_forward_fails_only_the_prompt_that_joined_it(engine, monkeypatch):
    clean, _ = _run(engine, None)
    marker = engine.tokenizer.encode(POISON_PROMPT)
    original = engine.model.forward_rows
    calls = {"poisoned": 0}

    def forward_rows(tokens, *args, **kwargs):
        if any(tokens[i : i + len(marker)] == marker for i in range(len(tokens))):
            calls["poisoned"] += 1
            raise InjectedFault("poisoned forward")
        return original(tokens, *args, **kwargs)

    monkeypatch.setattr(engine.model, "forward_rows", forward_rows)
    poison = SamplingParams(do_sample=True, seed=1, max_new_tokens=30)
    results, failed = _run(engine, poison, POISON_PROMPT)
    assert isinstance(failed, InjectedFault)
    assert calls["poisoned"] >= 2  # with the decoding rows, then alone
    assert _texts(results) == _texts(clean)


def test_the_engine_serves_on_after_poisons(engine):
    result = engine.generate_sync("Hello", SamplingParams(max_new_tokens=5))
    assert len(result.outputs[0].token_ids) == 5
