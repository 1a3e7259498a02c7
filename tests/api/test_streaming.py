"""Streaming: native SSE on /invocations, the response-stream route through the real boto3 client, and the
engine batch behind both."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import boto3
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, EventStreamError

from gpt2serve.api.streaming import EngineBatch, wants_stream
from gpt2serve.engine.config import EngineConfig
from gpt2serve.engine.engine import Engine
from gpt2serve.engine.errors import EngineOverloadedError
from gpt2serve.engine.params import SamplingParams
from gpt2serve.engine.request import GenerationResult, StreamDelta
from tests.api.conftest import ThreadServer, make_settings
from tests.checkpoints import make_checkpoint

PROMPT = "Streaming text, piece by piece:"
SAMPLED = {"mode": "sample", "top_k": 0, "top_p": 1.0, "temperature": 1.0}


def parse_sse(raw: bytes) -> list[tuple[str | None, object]]:
    """(event name, decoded data) of each event; every event must be whole UTF-8 JSON."""
    events = []
    for block in raw.split(b"\n\n"):
        if not block:
            continue
        name, data = None, None
        for line in block.decode("utf-8").split("\n"):
            field, _, value = line.partition(": ")
            if field == "event":
                name = value
            elif field == "data":
                data = json.loads(value)
        events.append((name, data))
    return events


def joined(events: list[tuple[str | None, object]]) -> tuple[dict[int, str], object]:
    """Text per sequence index, and the `done` event's outputs."""
    texts: dict[int, str] = {}
    done = None
    for name, data in events:
        if name == "done":
            done = data["outputs"]
        else:
            assert name is None, data
            texts[data["index"]] = texts.get(data["index"], "") + data["text"]
    return texts, done


def stream(client: httpx.Client, body: dict, **headers: str) -> tuple[httpx.Response, list]:
    with client.stream("POST", "/invocations", json=body, headers=headers) as r:
        raw = r.read()
    return r, parse_sse(raw) if r.status_code == 200 else []


@pytest.mark.parametrize(
    "body",
    [
        {"input": PROMPT, "mode": "greedy", "num_return_sequences": 2, "max_new_tokens": 12},
        {"input": PROMPT, "seed": 3, "num_return_sequences": 3, "max_new_tokens": 12, **SAMPLED},
        {"input": PROMPT, "mode": "beam", "num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 6},
        {"input": PROMPT, "seed": 1, "length": 10, "num_return_sequences": 2},  # first-generation format
        {"input": PROMPT, "test": True, "num_return_sequences": 2},
    ],
)
def test_native_stream_joins_to_the_non_streamed_answer(client: httpx.Client, body: dict) -> None:
    answer = client.post("/invocations", json=body).json()
    first_generation = "length" in body or "test" in body  # has no `stream` field: ask with Accept
    asked = body if first_generation else {**body, "stream": True}
    r, events = stream(client, asked, accept="text/event-stream")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers.get("transfer-encoding") == "chunked"
    texts, done = joined(events)
    assert done == answer and events[-1][0] == "done"
    strings = answer if isinstance(answer, list) else answer["output"]
    assert [texts[i] for i in range(len(strings))] == strings
    last = {data["index"]: data["finish_reason"] for _, data in events[:-1]}  # each sequence's last event
    assert len(last) == len(strings) and set(last.values()) <= {"stop", "length"}


def test_done_event_counts_the_tokens(client: httpx.Client, api_server: ThreadServer) -> None:
    body = {"input": PROMPT, "mode": "beam", "num_beams": 2, "num_return_sequences": 2, "max_new_tokens": 5}
    _, events = stream(client, {**body, "stream": True})
    name, done = events[-1]
    ids = api_server.state.engine.tokenizer.encode(PROMPT)
    length = [data["finish_reason"] == "length" for _, data in events[:-1] if data["finish_reason"]]
    assert name == "done" and len(length) == 2
    made = done["usage"]["completion_tokens"]
    assert done["usage"]["prompt_tokens"] == len(ids)
    assert made <= 10 and (made == 10) == all(length)


def test_accept_header_alone_asks_for_a_stream(client: httpx.Client) -> None:
    body = {"input": PROMPT, "mode": "greedy", "num_return_sequences": 1, "max_new_tokens": 4}
    r, events = stream(client, body, accept="text/event-stream")
    assert r.status_code == 200 and events[-1][0] == "done"


def test_multibyte_characters_are_never_split(client: httpx.Client) -> None:
    """Random weights sample many byte-level tokens that are only part of a character; the pieces must still
    join to the exact non-streamed text (an early U+FFFD would break the join)."""
    body = {"input": "\u00e9\u00e8 \u4e2d\u6587 \U0001f600", "seed": 21, "num_return_sequences": 4,
            "max_new_tokens": 60, **SAMPLED, "temperature": 2.0}  # fmt: skip
    answer = client.post("/invocations", json=body).json()
    _, events = stream(client, {**body, "stream": True})
    texts, _ = joined(events)
    assert [texts[i] for i in range(4)] == answer
    assert any(ord(ch) > 127 for text in answer for ch in text[len(body["input"]) :])
    for text, full in zip(texts.values(), answer):
        assert text.count("\ufffd") == full.count("\ufffd")


def test_errors_before_the_stream_are_json(client: httpx.Client) -> None:
    r = client.post("/invocations", json={"input": PROMPT, "mode": "fast", "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "mode"


def test_wants_stream() -> None:
    assert wants_stream(None, {"stream": True})
    assert wants_stream("application/json, text/event-stream", {})
    assert not wants_stream("text/event-stream", {"stream": False})
    assert not wants_stream("text/event-stream;q=0", {})
    assert not wants_stream("*/*", {"input": "x"}) and not wants_stream(None, [1])


# -- the SageMaker runtime's InvokeEndpointWithResponseStream through boto3 ----------------------------


def runtime(url: str):
    return boto3.client(
        "sagemaker-runtime", endpoint_url=url, region_name="us-east-1", aws_access_key_id="x",
        aws_secret_access_key="x", config=Config(retries={"max_attempts": 1}),
    )  # fmt: skip


def boto3_stream(url: str, body: dict) -> tuple[dict, bytes]:
    response = runtime(url).invoke_endpoint_with_response_stream(
        EndpointName="gpt-2", Body=json.dumps(body), ContentType="application/json"
    )
    parts = [event["PayloadPart"]["Bytes"] for event in response["Body"]]
    return response, b"".join(parts)


def test_boto3_response_stream_equals_the_answer(api_server: ThreadServer, client: httpx.Client) -> None:
    for body in (
        {"input": PROMPT, "mode": "greedy", "num_return_sequences": 1, "max_new_tokens": 10},
        {"input": PROMPT, "seed": 9, "num_return_sequences": 2, "max_new_tokens": 10, **SAMPLED},
    ):
        answer = client.post("/invocations", json=body).json()
        response, raw = boto3_stream(api_server.url, body)
        assert response["ContentType"] == "text/event-stream"
        texts, done = joined(parse_sse(raw))
        assert done == answer and [texts[i] for i in range(len(answer))] == answer


def test_boto3_response_stream_errors_before_the_start(api_server: ThreadServer) -> None:
    client = runtime(api_server.url)
    with pytest.raises(client.exceptions.ModelError) as info:
        client.invoke_endpoint_with_response_stream(
            EndpointName="gpt-2", Body=b'{"input": "a", "mode": "fast"}', ContentType="application/json"
        )
    error = info.value.response
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 424
    assert error["OriginalStatusCode"] == 400 and "mode" in error["Error"]["Message"]
    assert json.loads(error["OriginalMessage"])["error"]["param"] == "mode"
    with pytest.raises(ClientError):
        client.invoke_endpoint_with_response_stream(
            EndpointName="e", Body=b"[", ContentType="application/json"
        )


@pytest.fixture(scope="module")
def deadline_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    """A server whose requests run out of time after 1 s, with a model big enough that LONG takes longer
    on any CPU (8 layers, 256 wide: ~80 MB of float32 weights per step, 4 x 900 tokens), while its first
    tokens come within milliseconds: LONG then fails mid-stream."""
    checkpoint = make_checkpoint(
        tmp_path_factory.mktemp("deadline_ckpt"), n_layer=8, n_head=4, n_embd=256, n_positions=1024
    )
    server = ThreadServer(make_settings(str(checkpoint), request_timeout_s=1.0)).start()
    try:
        yield server.wait_ready()
    finally:
        server.stop()


LONG = {"input": PROMPT, "mode": "sample", "top_p": 0.9, "seed": 2, "num_return_sequences": 4,
        "max_new_tokens": 900}  # fmt: skip


def test_mid_stream_errors(deadline_server: ThreadServer) -> None:
    with httpx.Client(base_url=deadline_server.url, timeout=60) as client:
        r, events = stream(client, {**LONG, "stream": True})
    assert r.status_code == 200
    name, data = events[-1]
    assert name == "error" and data["error"]["type"] == "timeout_error"
    with pytest.raises(EventStreamError) as info:
        boto3_stream(deadline_server.url, LONG)
    assert info.value.response["Error"]["Code"] == "ModelStreamError"


# -- EngineBatch on a real engine ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> Iterator[Engine]:
    engine = Engine.load(str(tiny_checkpoint), EngineConfig(max_batch_size=4, max_queue=2))
    engine.start()
    yield engine
    engine.stop()


def test_engine_batch_streams_every_prompt(engine: Engine) -> None:
    async def run() -> tuple[dict, list[GenerationResult]]:
        params = SamplingParams(do_sample=True, seed=4, n=2, max_new_tokens=8)
        batch = EngineBatch(engine, ["one", "two"], params, stream=True)
        pieces: dict = {}
        async for k, item in batch.items():
            if isinstance(item, StreamDelta):
                pieces[k, item.index] = pieces.get((k, item.index), "") + item.text
        return pieces, batch.results

    pieces, results = asyncio.run(run())
    assert [r.prompt for r in results] == ["one", "two"]
    for k, result in enumerate(results):
        assert [pieces[k, o.index] for o in result.outputs] == [o.text for o in result.outputs]


def test_engine_batch_is_all_or_nothing(engine: Engine) -> None:
    """8 prompts cannot all queue (4 slots, queue of 2): the batch is refused and the ones already queued
    are cancelled, not left to run."""
    before = replace(engine.stats)

    async def run() -> None:
        with pytest.raises(EngineOverloadedError):
            EngineBatch(engine, [f"prompt {i}" for i in range(8)], SamplingParams(max_new_tokens=100), False)

    asyncio.run(run())
    deadline = time.monotonic() + 10
    while (engine.scheduler.waiting or engine.scheduler.running) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.scheduler.slots_in_use == 0 and not engine.scheduler.waiting
    assert engine.stats.requests_cancelled - before.requests_cancelled >= 2
    assert engine.stats.requests_finished == before.requests_finished
