"""Bad requests get a documented status and a message naming the problem; the server keeps serving."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from gpt2serve.api.errors import describe, install_error_handlers
from gpt2serve.api.middleware import RequestContextMiddleware
from gpt2serve.engine.errors import (
    EngineOverloadedError,
    EngineStoppedError,
    InvalidParameterError,
    RequestTimeoutError,
)

OK = {"input": "Hello there"}
JSON_CT = {"content-type": "application/json"}
BOUNDS = "[1e-05, 100000]"  # the float32-safe range of temperature and repetition_penalty


def case(id: str, body: object, status: int, fragment: str, param: str | None = None, **extra: object):
    return pytest.param(body, status, fragment, param, extra, id=id)


FIELD_CASES = [
    case("input-missing", {"max_length": 20}, 400, "`input` is required", "input"),
    case("input-not-string", {"input": 42}, 400, "valid string", "input"),
    case("input-null", {"input": None}, 400, "valid string", "input"),
    case("input-empty", {"input": ""}, 400, "must not be empty", "input"),
    case("input-past-context", {"input": "hello " * 200}, 400, "context is 128", "input"),
    case("max_length-string", {**OK, "max_length": "5"}, 400, "integer; got '5' (string)", "max_length"),
    case("max_length-float", {**OK, "max_length": 5.5}, 400, "valid integer", "max_length"),
    case("max_length-zero", {**OK, "max_length": 0}, 400, ">= 1", "max_length"),
    case("max_length-past-context", {**OK, "max_length": 2000}, 400, "<= 128", "max_length"),
    case("max_length-within-prompt", {**OK, "max_length": 2}, 400, "counts the prompt", "max_length"),
    case("max_new_tokens-zero", {**OK, "max_new_tokens": 0}, 400, ">= 1", "max_new_tokens"),
    case("both-lengths", {**OK, "max_length": 20, "max_new_tokens": 5}, 400, "not both", "max_new_tokens"),
    case("n-zero", {**OK, "num_return_sequences": 0}, 400, "[1, 16]", "num_return_sequences"),
    case("n-too-many", {**OK, "num_return_sequences": 17}, 400, "[1, 16]", "num_return_sequences"),
    case("n-string", {**OK, "num_return_sequences": "3"}, 400, "valid integer", "num_return_sequences"),
    case("n-bool", {**OK, "num_return_sequences": True}, 400, "valid integer", "num_return_sequences"),
    case("mode-unknown", {**OK, "mode": "nucleus"}, 400, "must be one of", "mode"),
    case("mode-not-string", {**OK, "mode": 3}, 400, "valid string", "mode"),
    case("top_p-zero", {**OK, "top_p": 0}, 400, "(0, 1]", "top_p"),
    case("top_p-above-one", {**OK, "top_p": 1.5}, 400, "(0, 1]", "top_p"),
    case("top_p-string", {**OK, "top_p": "high"}, 400, "valid number", "top_p"),
    case("top_k-negative", {**OK, "mode": "sample-top-k", "top_k": -1}, 400, ">= 0", "top_k"),
    case("top_k-float", {**OK, "top_k": 1.5}, 400, "valid integer", "top_k"),
    case("temperature-zero", {**OK, "mode": "sample", "temperature": 0}, 400, BOUNDS, "temperature"),
    case("temperature-negative", {**OK, "mode": "sample", "temperature": -1}, 400, BOUNDS, "temperature"),
    case("temperature-tiny", {**OK, "mode": "sample", "temperature": 1e-300}, 400, BOUNDS, "temperature"),
    case("temperature-huge", {**OK, "mode": "sample", "temperature": 1e300}, 400, BOUNDS, "temperature"),
    case("repetition_penalty-tiny", {**OK, "repetition_penalty": 1e-300}, 400, BOUNDS, "repetition_penalty"),
    case("max_new_tokens-huge", {**OK, "max_new_tokens": 10**6}, 400, "<= 128", "max_new_tokens"),
    case("temperature-string", {**OK, "temperature": "hot"}, 400, "valid number", "temperature"),
    case("num_beams-zero", {**OK, "mode": "beam", "num_beams": 0}, 400, "[1, 16]", "num_beams"),
    case("num_beams-too-many", {**OK, "mode": "beam", "num_beams": 17}, 400, "[1, 16]", "num_beams"),
    case("beams-fewer-than-n", {**OK, "mode": "beam", "num_beams": 2}, 400, "<= num_beams",
         "num_return_sequences"),
    case("ngram-negative", {**OK, "no_repeat_ngram_size": -1}, 400, ">= 0", "no_repeat_ngram_size"),
    case("seed-negative", {**OK, "seed": -2}, 400, "or -1 for no seed", "seed"),
    case("seed-string", {**OK, "seed": "1"}, 400, "valid integer", "seed"),
    case("seed-huge", {**OK, "seed": 2**64}, 400, "`seed` must be", "seed"),
    case("stop-number", {**OK, "stop": 5}, 400, "valid string", "stop"),
    case("stop-empty-string", {**OK, "stop": [""]}, 400, "non-empty", "stop"),
    case("stop-too-many", {**OK, "stop": [str(i) for i in range(9)]}, 400, "at most 8", "stop"),
    case("repetition_penalty-zero", {**OK, "mode": "beam", "repetition_penalty": 0}, 400, BOUNDS,
         "repetition_penalty"),
    case("stream-not-bool", {**OK, "stream": "yes"}, 400, "valid boolean", "stream"),
    case("v1-length-zero", {**OK, "length": 0}, 400, "`length` must be", "length"),
    case("v1-k-negative", {**OK, "k": -1}, 400, "`k` must be", "k"),
    case("v1-p-above-one", {**OK, "p": 2.0}, 400, "`p` must be", "p"),
    case("v1-test-not-bool", {**OK, "test": "yes"}, 400, "valid boolean", "test"),
    case("v1-repetition_penalty-negative", {**OK, "repetition_penalty": -1.0}, 400, BOUNDS,
         "repetition_penalty"),
    case("v1-stop_token-number", {**OK, "stop_token": 7}, 400, "valid string", "stop_token"),
    case("formats-mixed", {**OK, "length": 10, "mode": "beam"}, 400, "mixes fields", "mode"),
    case("body-array", [OK], 400, "JSON object", None),
    case("body-string", "Hello", 400, "JSON object", None),
    case("body-null", None, 400, "JSON object", None),
]


@pytest.mark.parametrize("body, status, fragment, param, extra", FIELD_CASES)
def test_bad_fields(client: httpx.Client, body, status, fragment, param, extra) -> None:
    r = client.post("/invocations", content=json.dumps(body), headers=JSON_CT)
    check_error(client, r, status, fragment, param)


RAW_CASES = [
    case("empty-body", b"", 400, "body is empty"),
    case("blank-body", b"  \n", 400, "body is empty"),
    case("malformed-json", b'{"input": ', 400, "malformed JSON"),
    case("trailing-garbage", b'{"input": "a"} x', 400, "malformed JSON"),
    case("not-utf8", b'{"input": "caf\xe9"}', 400, "not valid UTF-8"),
    case("too-large", b'{"input": "' + b"a" * 60_000 + b'"}', 413, "(0.05 MB)"),
    case("content-type-text", b'{"input": "a"}', 415, "text/plain", headers={"content-type": "text/plain"}),
    case("content-type-form", b"input=a", 415, "x-www-form-urlencoded",
         headers={"content-type": "application/x-www-form-urlencoded"}),
    case("charset-latin1", b'{"input": "a"}', 415, "UTF-8",
         headers={"content-type": "application/json; charset=latin-1"}),
    case("accept-html", b'{"input": "a"}', 406, "text/html", headers={**JSON_CT, "accept": "text/html"}),
    case("accept-csv-q0-json", b'{"input": "a"}', 406, "text/csv",
         headers={**JSON_CT, "accept": "text/csv, application/json;q=0"}),
    case("custom-attributes-too-long", b'{"input": "a"}', 400, "at most 1024",
         headers={**JSON_CT, "X-Amzn-SageMaker-Custom-Attributes": "x" * 1025}),
    case("jsonlines-malformed-line-number", b'{"input": "a", "test": true}\n{"input"\n', 400, "line 2",
         headers={"content-type": "application/jsonlines"}, per_line=True),
]  # fmt: skip


@pytest.mark.parametrize("body, status, fragment, param, extra", RAW_CASES)
def test_bad_bodies_and_headers(client: httpx.Client, body, status, fragment, param, extra) -> None:
    headers = extra.get("headers", JSON_CT)
    r = client.post("/invocations", content=body, headers=headers)
    if extra.get("per_line"):  # JSON Lines: 200, and the bad line carries the error
        r = _line_error(r)
    check_error(client, r, status, fragment, param)


def test_chunked_body_over_the_limit(client: httpx.Client) -> None:
    def chunks():
        yield b'{"input": "'
        for _ in range(40):
            yield b"a" * 2000

    r = client.post("/invocations", content=chunks(), headers=JSON_CT)
    assert "content-length" not in r.request.headers
    check_error(client, r, 413, "(0.05 MB)", None)


@pytest.mark.parametrize(
    "method, path, status",
    [("GET", "/invocations", 405), ("POST", "/ping", 405), ("GET", "/nowhere", 404)],
)
def test_wrong_routes(client: httpx.Client, method: str, path: str, status: int) -> None:
    check_error(client, client.request(method, path), status, "", None)


@pytest.mark.parametrize(
    "exc, status, kind",
    [
        (InvalidParameterError("top_k", "bad top_k"), 400, "invalid_request_error"),
        (EngineOverloadedError("busy"), 503, "overloaded_error"),
        (EngineStoppedError("stopping"), 503, "service_unavailable"),
        (RequestTimeoutError("too slow"), 504, "timeout_error"),
        (RuntimeError("secret internals"), 500, "server_error"),
    ],
)
def test_error_table(exc: Exception, status: int, kind: str) -> None:
    info = describe(exc, request_id="rid-7")
    assert info.status == status and info.body["error"]["type"] == kind
    if status == 503:
        assert info.headers["Retry-After"]
    if status == 500:
        assert "rid-7" in info.body["error"]["message"]
        assert "secret internals" not in info.body["error"]["message"]


def test_unhandled_error_is_a_500_envelope_with_the_request_id() -> None:
    # The real middleware and handlers around a route that fails the way a bug would.
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=1000)

    @app.get("/fails")
    async def fails() -> None:
        raise RuntimeError("secret internals")

    with TestClient(app, raise_server_exceptions=False) as test_client:
        r = test_client.get("/fails", headers={"X-Request-Id": "req-42"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "req-42"
    assert r.json()["error"]["type"] == "server_error"
    assert "req-42" in r.json()["error"]["message"] and "secret" not in r.text


def _line_error(r: httpx.Response) -> httpx.Response:
    assert r.status_code == 200, r.text
    errors = [json.loads(line) for line in r.text.splitlines() if "error" in json.loads(line)]
    assert len(errors) == 1
    return httpx.Response(400, json=errors[0])


def check_error(
    client: httpx.Client, r: httpx.Response, status: int, fragment: str, param: str | None
) -> None:
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] is None
    assert fragment in error["message"], error
    if param is not None:
        assert error["param"] == param, error
    assert client.get("/ping").status_code == 200
