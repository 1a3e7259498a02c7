"""StepPath: the forward path and chooser the config asks for; a step's logits and a prompt's cache the
same on the model's own step and the static one (float32 on the CPU)."""

from __future__ import annotations

import pytest
import torch

from gpt2serve.engine.chooser import TokenChooser
from gpt2serve.engine.config import EngineConfig
from gpt2serve.engine.device.chooser import DeviceTokenChooser
from gpt2serve.engine.device.static_step import StaticStep
from gpt2serve.engine.loader import load_checkpoint
from gpt2serve.engine.model import GPT2
from gpt2serve.engine.params import SamplingParams
from gpt2serve.engine.request import Request
from gpt2serve.engine.step_path import StepPath

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load_checkpoint(str(tiny_checkpoint))


@pytest.fixture(scope="module")
def model(loaded):
    return GPT2(loaded.config, loaded.state_dict, "float32", "cpu")  # the lazy state dict is read once


def _paths(model: GPT2) -> tuple[StepPath, StepPath]:
    eager = StepPath.of(model, model.new_cache(4, 128), EngineConfig(decode_step="eager"), CPU)
    static = StepPath.of(model, model.new_cache(5, 128), EngineConfig(decode_step="static"), CPU)
    return eager, static


def _request(loaded, slots: list[int]) -> Request:
    ids = loaded.tokenizer.encode("Once upon a time, in a land far away")
    params = SamplingParams(do_sample=True, n=len(slots), seed=3)  # no top-k: every logit is read
    req = Request("", ids, params, 8, lambda _: None, False, None)
    req.slots = slots
    req.start(loaded.tokenizer)
    return req


def test_the_path_and_its_chooser_follow_the_config(model):
    eager, static = _paths(model)
    assert eager.static is None and eager.chooser is TokenChooser
    assert isinstance(static.static, StaticStep) and static.chooser is DeviceTokenChooser
    for rows in (1, 8, 10_000):
        assert eager.joins(rows) == eager.model.takes_rows(rows, eager.cache)
        assert not static.joins(rows)  # prompts never join a static step


def test_a_prompt_fills_its_requests_slots_and_both_paths_step_alike(loaded, model):
    eager, static = _paths(model)
    got = []
    for path in (eager, static):
        req = _request(loaded, [1, 2])
        first = path.forward([], [req])
        n = len(req.prompt_ids)
        assert first.shape == (1, loaded.config.vocab_size)
        assert torch.equal(path.cache.k[:, 2, :, :n], path.cache.k[:, 1, :, :n])  # copied to slot 2
        for seq, token in zip(req.sequences, (11, 12)):
            seq.history.append(token)
        got.append((first, path.forward([(req, s) for s in req.sequences], [])))
    (eager_first, eager_step), (static_first, static_step) = got
    assert torch.equal(eager_first, static_first)  # the prompt ran by the model's own step on both
    assert eager_step.shape == (2, loaded.config.vocab_size)
    torch.testing.assert_close(static_step, eager_step, atol=2e-5, rtol=1e-5)
