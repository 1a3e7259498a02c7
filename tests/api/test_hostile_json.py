"""Hostile JSON (deep nesting, huge integer literals, non-finite numbers, lone surrogates) gets a 400 with
the error envelope on every route, and an error record on its own line in a JSON Lines body; never a 500
(each of these was a 500 before `gpt2serve.api.jsondecode`)."""

from __future__ import annotations

import json

import httpx
import pytest

from gpt2serve.api import jsondecode
from gpt2serve.api.errors import APIError

JSON_CT = {"content-type": "application/json"}
JSONL_CT = {"content-type": "application/jsonlines"}


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


# (id, body template with {f} for the prompt field, a fragment of the message, param)
HOSTILE = [
    ("nested-100", '{{"{f}": "hi", "x": ' + _deep(100) + "}}", "nested deeper than the limit of 64", None),
    ("nested-20000", '{{"{f}": "hi", "x": ' + _deep(20_000) + "}}", "nested deeper than the limit of 64",
     None),
    ("int-5000-digits", '{{"{f}": "hi", "seed": 1' + "0" * 5000 + "}}", "5001 characters", None),
    ("float-5000-digits", '{{"{f}": "hi", "temperature": 0.' + "1" * 5000 + "}}", "the limit is 100", None),
    ("float-infinite", '{{"{f}": "hi", "temperature": 1e999}}', "out of range for a 64-bit float", None),
    ("nan", '{{"{f}": "hi", "temperature": NaN}}', "NaN is not valid JSON", None),
    ("surrogate-prompt", '{{"{f}": "hi \\ud800 there"}}', "lone UTF-16 surrogate (\\ud800)", "{f}"),
    ("surrogate-stop", '{{"{f}": "hi", "stop": ["ok", "\\udfff"]}}', "lone UTF-16 surrogate (\\udfff)",
     "stop[1]"),
    ("surrogate-key", '{{"{f}": "hi", "\\ud83d": 1}}', "lone UTF-16 surrogate", None),
]  # fmt: skip
CASES = [pytest.param(body, fragment, param, id=name) for name, body, fragment, param in HOSTILE]


def _check(error: dict, fragment: str, param: str | None, field: str) -> None:
    assert fragment in error["message"], error
    assert error["type"] == "invalid_request_error"
    assert error["param"] == (param.format(f=field) if param else None)


@pytest.mark.parametrize("body, fragment, param", CASES)
def test_invocations(client: httpx.Client, body: str, fragment: str, param: str | None) -> None:
    r = client.post("/invocations", content=body.format(f="input"), headers=JSON_CT)
    assert r.status_code == 400, r.text
    _check(r.json()["error"], fragment, param, "input")


@pytest.mark.parametrize("body, fragment, param", CASES)
def test_invocations_stream(client: httpx.Client, body: str, fragment: str, param: str | None) -> None:
    headers = {**JSON_CT, "accept": "text/event-stream"}
    r = client.post("/invocations", content=body.format(f="input"), headers=headers)
    assert r.status_code == 400, r.text
    _check(r.json()["error"], fragment, param, "input")


@pytest.mark.parametrize("path", ["invocations", "invocations-response-stream"])
@pytest.mark.parametrize("body, fragment, param", CASES)
def test_runtime_paths_answer_model_error_of_400(
    client: httpx.Client, path: str, body: str, fragment: str, param: str | None
) -> None:
    r = client.post(f"/endpoints/e/{path}", content=body.format(f="input"), headers=JSON_CT)
    assert r.status_code == 424, r.text
    assert r.json()["OriginalStatusCode"] == 400
    _check(r.json()["error"], fragment, param, "input")


@pytest.mark.parametrize("body, fragment, param", CASES)
def test_openai_completions(client: httpx.Client, body: str, fragment: str, param: str | None) -> None:
    r = client.post("/v1/completions", content=body.format(f="prompt"), headers=JSON_CT)
    assert r.status_code == 400, r.text
    _check(r.json()["error"], fragment, param, "prompt")


@pytest.mark.parametrize("body, fragment, param", CASES)
def test_json_lines_line_gets_an_error_record(
    client: httpx.Client, body: str, fragment: str, param: str | None
) -> None:
    good = json.dumps({"input": "Hello", "max_new_tokens": 2, "num_return_sequences": 1, "mode": "greedy"})
    lines = "\n".join([good, body.format(f="input"), good]) + "\n"
    r = client.post("/invocations", content=lines, headers=JSONL_CT)
    assert r.status_code == 200, r.text
    records = [json.loads(line) for line in r.text.splitlines()]
    assert len(records) == 3
    assert isinstance(records[0], list) and isinstance(records[2], list)
    _check(records[1]["error"], fragment, param, "input")
    assert "line 2" in records[1]["error"]["message"]


def test_limits_are_exact() -> None:
    """At the limits decoding succeeds; one past them it is refused."""
    at_depth = jsondecode.loads(_deep(jsondecode.MAX_DEPTH))
    assert isinstance(at_depth, list)
    with pytest.raises(APIError, match="nested deeper"):
        jsondecode.loads(_deep(jsondecode.MAX_DEPTH + 1))
    assert jsondecode.loads("9" * jsondecode.MAX_NUMBER_CHARS) == int("9" * jsondecode.MAX_NUMBER_CHARS)
    with pytest.raises(APIError, match="101 characters"):
        jsondecode.loads("9" * (jsondecode.MAX_NUMBER_CHARS + 1))
    assert jsondecode.loads('"\\ud83d\\ude00"') == "\U0001f600"  # a surrogate pair is one valid character
