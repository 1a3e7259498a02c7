"""The OpenAI-compatible API (/v1) through the official `openai` client, against the real server."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from gpt2serve.engine.engine import Engine
from tests.api.conftest import ThreadServer

PROMPT = "The meaning of life is"


def served_engine(server: ThreadServer) -> Engine:
    return server.server.config.app.state.server.engine


@pytest.fixture(scope="module")
def oai(api_server: ThreadServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{api_server.url}/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def model_name(api_server: ThreadServer) -> str:
    return served_engine(api_server).model_name


def create(oai: openai.OpenAI, **kwargs: object):
    kwargs.setdefault("model", "gpt-2")
    kwargs.setdefault("prompt", PROMPT)
    return oai.completions.create(**kwargs)


def streamed_texts(oai: openai.OpenAI, **kwargs: object) -> tuple[dict[int, str], dict[int, str], list]:
    """(text per choice index, finish_reason per index, all chunks) of a streamed completion."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    chunks = list(create(oai, stream=True, **kwargs))
    for chunk in chunks:
        assert chunk.object == "text_completion"
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason is not None:
                assert choice.index not in reasons, "a choice finished twice"
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, chunks


def test_completion_object_shape_and_usage(
    oai: openai.OpenAI, model_name: str, api_server: ThreadServer
) -> None:
    r = create(oai, max_tokens=8, temperature=0)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.created > 0
    assert r.model == model_name
    assert len(r.choices) == 1 and r.choices[0].index == 0 and r.choices[0].logprobs is None
    assert r.choices[0].finish_reason in ("stop", "length")
    prompt_tokens = len(served_engine(api_server).tokenizer.encode(PROMPT))
    assert r.usage.prompt_tokens == prompt_tokens
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_greedy_equals_the_native_greedy_answer(oai: openai.OpenAI, client: httpx.Client) -> None:
    r = create(oai, max_tokens=10, temperature=0)
    native = client.post("/invocations", json={"input": PROMPT, "mode": "greedy", "max_new_tokens": 10,
                                                "num_return_sequences": 1})  # fmt: skip
    assert native.status_code == 200, native.text
    assert PROMPT + r.choices[0].text == native.json()[0]


def test_default_max_tokens_is_16(oai: openai.OpenAI) -> None:
    r = create(oai, temperature=0)
    assert r.usage.completion_tokens <= 16
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 16


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.9, "seed": 5, "top_p": 0.95}])
def test_stream_equals_non_stream(oai: openai.OpenAI, sampling: dict) -> None:
    args = {"prompt": [PROMPT, "Once upon a time"], "n": 2, "max_tokens": 12, **sampling}
    full = create(oai, **args)
    texts, reasons, _ = streamed_texts(oai, **args)
    assert sorted(texts) == [0, 1, 2, 3]
    for choice in full.choices:
        assert texts[choice.index] == choice.text
        assert reasons[choice.index] == choice.finish_reason


def test_n_and_prompt_lists_index_choices(oai: openai.OpenAI) -> None:
    prompts = ["Hello there", "A long time ago", "Numbers: 1, 2, 3"]
    r = create(oai, prompt=prompts, n=2, max_tokens=6, seed=3)
    assert [c.index for c in r.choices] == list(range(6))
    prompt_tokens = completion_tokens = 0
    for k, prompt in enumerate(prompts):
        alone = create(oai, prompt=prompt, n=2, max_tokens=6, seed=3)
        assert [c.text for c in r.choices[2 * k : 2 * k + 2]] == [c.text for c in alone.choices]
        prompt_tokens += alone.usage.prompt_tokens
        completion_tokens += alone.usage.completion_tokens
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, completion_tokens)


def test_seed_determinism(oai: openai.OpenAI) -> None:
    a = create(oai, max_tokens=8, seed=7, n=2)
    b = create(oai, max_tokens=8, seed=7, n=2)
    c = create(oai, max_tokens=8, seed=8, n=2)
    assert [x.text for x in a.choices] == [x.text for x in b.choices]
    assert [x.text for x in a.choices] != [x.text for x in c.choices]
    assert a.choices[0].text != a.choices[1].text  # n samples are independent


@pytest.mark.parametrize("as_list", [False, True])
def test_stop_cuts_the_text(oai: openai.OpenAI, as_list: bool) -> None:
    full = create(oai, max_tokens=16, temperature=0).choices[0].text
    assert len(full) >= 6, full
    stop = full[3:6]
    cut = create(oai, max_tokens=16, temperature=0, stop=[stop, "\u2603never"] if as_list else stop)
    assert cut.choices[0].text == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    texts, reasons, _ = streamed_texts(oai, max_tokens=16, temperature=0, stop=stop)
    assert texts[0] == cut.choices[0].text and reasons[0] == "stop"


def test_logprobs_legacy_shape(oai: openai.OpenAI) -> None:
    r = create(oai, max_tokens=6, temperature=0, logprobs=3)
    choice = r.choices[0]
    lp = choice.logprobs
    count = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == count
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for token, logprob, top, offset in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset):
        assert logprob <= 0 and 1 <= len(top) <= 3 and all(v <= 0 for v in top.values())
        assert logprob == pytest.approx(max(top.values()), abs=1e-4)  # greedy takes the most likely token
        if not token.startswith("bytes:"):
            assert choice.text[offset : offset + len(token)] == token


def test_echo_with_and_without_logprobs(oai: openai.OpenAI, api_server: ThreadServer) -> None:
    plain = create(oai, max_tokens=5, temperature=0).choices[0].text
    echoed = create(oai, max_tokens=5, temperature=0, echo=True).choices[0].text
    assert echoed == PROMPT + plain
    texts, _, _ = streamed_texts(oai, max_tokens=5, temperature=0, echo=True)
    assert texts[0] == PROMPT + plain
    r = create(oai, max_tokens=5, temperature=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    n_prompt = len(served_engine(api_server).tokenizer.encode(PROMPT))
    assert "".join(lp.tokens[:n_prompt]) == PROMPT
    assert lp.token_logprobs[:n_prompt] == [None] * n_prompt
    assert lp.top_logprobs[:n_prompt] == [None] * n_prompt
    assert lp.text_offset[0] == 0 and lp.text_offset[n_prompt] == len(PROMPT)
    assert len(lp.tokens) == n_prompt + r.usage.completion_tokens


def test_stream_include_usage(oai: openai.OpenAI) -> None:
    _, _, chunks = streamed_texts(oai, max_tokens=4, temperature=0, n=2,
                                  stream_options={"include_usage": True})  # fmt: skip
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_models(oai: openai.OpenAI, model_name: str) -> None:
    models = oai.models.list()
    assert [m.id for m in models.data] == [model_name]
    assert oai.models.retrieve(model_name).owned_by == "gpt2serve"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("davinci")


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": 6}, "logprobs"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"seed": -5}, "seed"),
        ({"suffix": "the end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"stream": True, "logprobs": 2}, "logprobs"),
        ({"stop": ["a", ""]}, "stop"),
    ],
)
def test_bad_parameters_are_400_naming_the_field(oai: openai.OpenAI, kwargs: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        create(oai, **kwargs)
    error = info.value.body
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


def test_best_of_equal_to_n_is_accepted(oai: openai.OpenAI) -> None:
    assert len(create(oai, max_tokens=2, n=2, best_of=2, seed=1).choices) == 2


def test_chat_is_refused_with_a_pointer(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="gpt-2", messages=[{"role": "user", "content": "hi"}])
    assert "/v1/completions" in info.value.body["message"]


def test_raw_error_envelope(client: httpx.Client) -> None:
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = client.post("/v1/completions", json={"model": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": "3"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
