"""The SageMaker-compatible generation API (docs/API.md §1, §2) against the real server and a tiny model."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from gpt2serve.api.protocol import V1_TEST_OUTPUT

PROMPT = "This is an input text"
SHORT = {"max_length": 16}  # keeps each generation to a few tokens


def post(client: httpx.Client, body: object, **headers: str) -> httpx.Response:
    return client.post("/invocations", json=body, headers=headers)


def generate(client: httpx.Client, body: dict) -> list[str]:
    r = post(client, body)
    assert r.status_code == 200, r.text
    return r.json()


def test_defaults_give_three_strings_starting_with_the_prompt(client: httpx.Client) -> None:
    r = post(client, {"input": PROMPT, "seed": 0})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["x-request-id"]
    out = r.json()
    assert isinstance(out, list) and len(out) == 3
    assert all(isinstance(s, str) and s.startswith(PROMPT) and len(s) > len(PROMPT) for s in out)


@pytest.mark.parametrize(
    "mode, extra, n",
    [
        ("sample-top-p", {"top_p": 0.5}, 2),
        ("sample-top-k", {"top_k": 5}, 2),
        ("sample", {"temperature": 1.3, "top_k": 20, "top_p": 0.9}, 2),
        ("beam", {"num_beams": 3}, 2),
        ("greedy", {}, 1),
    ],
)
def test_every_mode(client: httpx.Client, mode: str, extra: dict, n: int) -> None:
    body = {"input": PROMPT, "mode": mode, "num_return_sequences": n, "seed": 3, **SHORT, **extra}
    out = generate(client, body)
    assert len(out) == n
    assert all(s.startswith(PROMPT) for s in out)


def test_greedy_with_n_returns_n_identical_strings(client: httpx.Client) -> None:
    out = generate(client, {"input": PROMPT, "mode": "greedy", "num_return_sequences": 3, **SHORT})
    assert len(out) == 3 and len(set(out)) == 1


def test_seeded_requests_repeat(client: httpx.Client) -> None:
    body = {"input": PROMPT, "seed": 1234, "num_return_sequences": 2, **SHORT}
    assert generate(client, body) == generate(client, body)


def test_seed_minus_one_is_unseeded(client: httpx.Client) -> None:
    assert len(generate(client, {"input": PROMPT, "seed": -1, "num_return_sequences": 1, **SHORT})) == 1


def test_max_length_counts_the_prompt(client: httpx.Client) -> None:
    from gpt2serve.engine.tokenizer import Tokenizer

    prompt_len = len(Tokenizer.bundled().encode(PROMPT))
    greedy = {"input": PROMPT, "mode": "greedy", "num_return_sequences": 1}
    by_length = generate(client, {**greedy, "max_length": prompt_len + 4})
    by_new_tokens = generate(client, {**greedy, "max_new_tokens": 4})
    assert by_length == by_new_tokens


def test_stop_cuts_the_text(client: httpx.Client) -> None:
    greedy = {"input": PROMPT, "mode": "greedy", "num_return_sequences": 1, "max_new_tokens": 12}
    full = generate(client, greedy)[0]
    continuation = full[len(PROMPT) :]
    stop = continuation[3:6]
    assert len(stop) == 3
    cut = generate(client, {**greedy, "stop": stop})[0]
    assert cut == PROMPT + continuation[: continuation.index(stop)]
    assert generate(client, {**greedy, "stop": [stop, "\u2603never"]})[0] == cut


def test_unknown_keys_are_ignored(client: httpx.Client) -> None:
    body = {"input": PROMPT, "seed": 5, **SHORT}
    assert generate(client, {**body, "client_tag": "x", "options": {"a": 1}}) == generate(client, body)


def test_v1_request_shape(client: httpx.Client) -> None:
    r = post(client, {"input": PROMPT, "length": 6, "seed": 2, "num_return_sequences": 2, "k": 10, "p": 0.9})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["input"] == PROMPT and body["test"] is False
    assert len(body["output"]) == 2 and all(isinstance(s, str) for s in body["output"])
    assert not any(s.startswith(PROMPT) for s in body["output"])  # continuations only


def test_v1_defaults_and_repetition_penalty_alone(client: httpx.Client) -> None:
    body = post(client, {"input": PROMPT, "repetition_penalty": 10.0, "seed": 4}).json()
    assert set(body) == {"input", "output", "test"} and len(body["output"]) == 1


def test_v1_stop_token_cuts_the_output(client: httpx.Client) -> None:
    base = {"input": PROMPT, "length": 12, "seed": 9}
    full = post(client, base).json()["output"][0]
    stop = full[4:7]
    cut = post(client, {**base, "stop_token": stop}).json()["output"][0]
    assert cut == full[: full.index(stop)]


def test_v1_test_flag_returns_the_canned_sample(client: httpx.Client) -> None:
    body = post(client, {"input": PROMPT, "test": True, "num_return_sequences": 2}).json()
    assert body == {"input": PROMPT, "output": [V1_TEST_OUTPUT] * 2, "test": True}


def test_jsonlines_one_answer_per_line_in_order(client: httpx.Client) -> None:
    lines = [
        {"input": "first", "mode": "greedy", "num_return_sequences": 1, "max_new_tokens": 3},
        {"input": 5},
        {"input": "third", "length": 3, "seed": 1},
        {"input": "fourth", "test": True},
    ]
    # blank lines are skipped; CRLF line ends are fine
    body = "\n".join(json.dumps(x) for x in lines[:2]) + "\n\n"
    body += "\r\n".join(json.dumps(x) for x in lines[2:])
    r = client.post("/invocations", content=body, headers={"content-type": "application/jsonlines"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/jsonlines")
    answers = [json.loads(line) for line in r.text.splitlines()]
    assert len(answers) == 4
    assert answers[0][0].startswith("first")
    assert answers[1]["error"]["param"] == "input"
    assert answers[2]["input"] == "third"
    assert answers[3]["test"] is True


@pytest.mark.parametrize("content_type", ["application/jsonl", "application/x-jsonlines"])
def test_jsonlines_aliases_answered_as_json_when_asked(client: httpx.Client, content_type: str) -> None:
    body = '{"input": "a", "test": true}\n{"input": "b", "test": true}\n'
    headers = {"content-type": content_type, "accept": "application/json"}
    r = client.post("/invocations", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert [a["input"] for a in r.json()] == ["a", "b"]


def test_json_answered_as_jsonlines_when_asked(client: httpx.Client) -> None:
    r = post(client, {"input": "a", "test": True}, accept="application/jsonlines")
    assert r.headers["content-type"].startswith("application/jsonlines")
    assert r.text.endswith("\n") and json.loads(r.text)["input"] == "a"


@pytest.mark.parametrize("accept", ["*/*", "text/html, application/json;q=0.9", "application/*"])
def test_accept_negotiation(client: httpx.Client, accept: str) -> None:
    r = post(client, {"input": "a", "test": True}, accept=accept)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")


def test_no_content_type_is_json(client: httpx.Client) -> None:
    r = client.post("/invocations", content=b'{"input": "a", "test": true}')
    assert r.status_code == 200 and r.json()["test"] is True


def test_custom_attributes_and_endpoint_path(client: httpx.Client) -> None:
    body = {"input": PROMPT, "seed": 8, **SHORT}
    headers = {"X-Amzn-SageMaker-Custom-Attributes": "trace=1,c000b4f9"}
    plain = post(client, body).json()
    via_endpoint = client.post("/endpoints/my-gpt2/invocations", json=body, headers=headers)
    assert via_endpoint.status_code == 200 and via_endpoint.json() == plain


def test_request_id_is_echoed(client: httpx.Client) -> None:
    r = post(client, {"input": "a", "test": True}, **{"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"


def test_ping_and_execution_parameters(client: httpx.Client) -> None:
    r = client.get("/ping")
    assert r.status_code == 200 and r.content == b""
    params = client.get("/execution-parameters").json()
    assert params == {"MaxConcurrentTransforms": 4, "BatchStrategy": "MULTI_RECORD", "MaxPayloadInMB": 1}


def test_concurrent_requests(client: httpx.Client) -> None:
    bodies = [{"input": f"prompt {i}", "seed": i, "num_return_sequences": 2, **SHORT} for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda b: generate(client, b), bodies))
    assert all(len(r) == 2 and r[0].startswith(b["input"]) for r, b in zip(results, bodies, strict=True))
