"""The engine loop on the static decode step (decode_step="static", eager on the CPU) against the
engine on the model's own step: greedy, processors and beams token for token, under concurrency."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from gpt2serve.engine.config import EngineConfig
from gpt2serve.engine.device.chooser import DeviceTokenChooser
from gpt2serve.engine.engine import Engine
from gpt2serve.engine.params import SamplingParams

PROMPTS = ["The quick brown fox", "Hello", "Once upon a time, in a land far away, there lived", "1 2 3 4 5 6"]


@pytest.fixture(scope="module")
def engines(tiny_checkpoint):
    eager = Engine.load(
        str(tiny_checkpoint), EngineConfig(device="cpu", max_batch_size=16, decode_step="eager")
    )
    static = Engine.load(
        str(tiny_checkpoint), EngineConfig(device="cpu", max_batch_size=16, decode_step="static")
    )
    for e in (eager, static):
        e.start()
    yield eager, static
    for e in (eager, static):
        e.stop()


def _together(engine: Engine, jobs: list[tuple[str, SamplingParams]]):
    """Every job submitted at once, so steps mix requests at different positions."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda job: engine.generate_sync(*job), jobs))


def _ids(result):
    return [o.token_ids for o in result.outputs]


def test_the_static_engine_uses_the_device_path(engines):
    eager, static = engines
    assert eager.path.static is None and static.path.static is not None
    assert static.path.chooser is DeviceTokenChooser
    assert static.cache.n_slots == static.scheduler.n_slots + 1  # the spare slot


def test_greedy_processors_and_beams_equal_the_eager_engine(engines):
    eager, static = engines
    jobs = [(p, SamplingParams(max_new_tokens=12 + 5 * i)) for i, p in enumerate(PROMPTS)]
    jobs += [
        (PROMPTS[0], SamplingParams(max_new_tokens=20, repetition_penalty=1.3, no_repeat_ngram_size=2)),
        (PROMPTS[2], SamplingParams(max_new_tokens=10, presence_penalty=0.5, frequency_penalty=0.5, n=2)),
        (PROMPTS[1], SamplingParams(num_beams=3, n=2, max_new_tokens=8)),
        (PROMPTS[3], SamplingParams(max_new_tokens=70)),  # past the first key bucket (64)
    ]
    want = [_ids(r) for r in _together(eager, jobs)]
    got = [_ids(r) for r in _together(static, jobs)]
    assert got == want
    assert static.stats.max_step_batch > 1  # the steps did batch


def test_seeded_sampling_is_reproducible_and_ends_as_asked(engines):
    _, static = engines
    seeded = SamplingParams(do_sample=True, top_k=40, top_p=0.9, temperature=0.8, seed=7, max_new_tokens=24)
    other = SamplingParams(do_sample=True, max_new_tokens=30, n=3)
    first = _together(static, [(PROMPTS[0], seeded), (PROMPTS[2], other)])
    again = _together(static, [(PROMPTS[0], seeded), (PROMPTS[1], other), (PROMPTS[3], other)])
    assert _ids(first[0]) == _ids(again[0])  # its neighbours changed, its tokens did not
    for result in first + again:
        for out in result.outputs:
            assert out.finish_reason in ("stop", "length")
            assert len(out.token_ids) <= 30
    stop = static.generate_sync(PROMPTS[0], seeded.replace(stop=(first[0].outputs[0].text[3:6],)))
    assert stop.outputs[0].finish_reason == "stop"
