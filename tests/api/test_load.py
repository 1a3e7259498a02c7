"""The server under load: abandoned streams free their slots, a full queue answers 503 at once, and
concurrent callers are batched together yet get exactly what they would get alone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from gpt2serve.engine.engine import Engine
from tests.api.conftest import ThreadServer, make_settings

PROMPT = "Under load:"


def served_engine(server: ThreadServer) -> Engine:
    return server.server.config.app.state.server.engine


def wait_idle(engine: Engine, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.scheduler
        if s.slots_in_use == 0 and not s.waiting and not s.running:
            return True
        time.sleep(0.02)
    return False


# (path, body) of a long streamed request, for each streaming route
STREAMS = [
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 120, "temperature": 0, "stream": True}),
    ("/invocations", {"input": PROMPT, "mode": "greedy", "num_return_sequences": 1, "max_new_tokens": 120,
                      "stream": True}),
    ("/endpoints/gpt-2/invocations-response-stream",
     {"input": PROMPT, "mode": "greedy", "num_return_sequences": 1, "max_new_tokens": 120}),
]  # fmt: skip


async def open_and_drop(client: httpx.AsyncClient, path: str, body: dict) -> int:
    """Open a stream, read its first chunk of body, and hang up."""
    async with client.stream("POST", path, json=body) as r:
        async for _ in r.aiter_raw():
            break
        return r.status_code


def test_dropped_streams_free_their_slots(api_server: ThreadServer, client: httpx.Client) -> None:
    engine = served_engine(api_server)
    assert wait_idle(engine)
    before = replace(engine.stats)

    async def run() -> list[int]:
        limits = httpx.Limits(max_connections=60)
        async with httpx.AsyncClient(base_url=api_server.url, timeout=60, limits=limits) as c:
            jobs = [open_and_drop(c, *STREAMS[i % len(STREAMS)]) for i in range(50)]
            return await asyncio.gather(*jobs)

    assert asyncio.run(run()) == [200] * 50
    assert wait_idle(engine), "abandoned streams still hold slots"
    cancelled = engine.stats.requests_cancelled - before.requests_cancelled
    assert cancelled >= 40, f"only {cancelled} of 50 dropped streams were cancelled"
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


@pytest.fixture(scope="module")
def small_server(tiny_checkpoint: Path) -> Iterator[ThreadServer]:
    """2 KV slots and a queue of 2: a burst of requests overflows at once."""
    server = ThreadServer(make_settings(str(tiny_checkpoint), max_batch_size=2, max_queue=2)).start()
    try:
        yield server.wait_ready()
    finally:
        server.stop()


NATIVE_GREEDY = {"input": PROMPT, "mode": "greedy", "num_return_sequences": 1, "max_new_tokens": 100}


async def timed_post(client: httpx.AsyncClient, path: str, body: dict) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    if body.get("stream"):
        async with client.stream("POST", path, json=body) as r:
            await r.aread()
    else:
        r = await client.post(path, json=body)
    return r, time.perf_counter() - started


def test_overload_answers_503_at_once(small_server: ThreadServer) -> None:
    bodies = [
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 100, "temperature": 0}),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 100, "temperature": 0, "stream": True}),
        ("/invocations", NATIVE_GREEDY),
        ("/invocations", {**NATIVE_GREEDY, "stream": True}),
    ]  # fmt: skip

    async def run() -> list[tuple[httpx.Response, float]]:
        async with httpx.AsyncClient(base_url=small_server.url, timeout=60) as c:
            return await asyncio.gather(*(timed_post(c, *bodies[i % 4]) for i in range(24)))

    answers = asyncio.run(run())
    busy = [(r, t) for r, t in answers if r.status_code == 503]
    served = [(r, t) for r, t in answers if r.status_code == 200]
    assert len(busy) + len(served) == len(answers), [r.status_code for r, _ in answers]
    assert busy and len(served) >= 2
    for r, _ in busy:
        assert r.headers["retry-after"] and r.json()["error"]["type"] == "overloaded_error"
    assert max(t for _, t in busy) < max(t for _, t in served)  # refused without waiting for a slot
    for r, _ in served:
        if r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.rstrip().endswith(("data: [DONE]", "}")) and "error" not in r.text
    assert wait_idle(served_engine(small_server))


def test_concurrent_callers_get_their_single_caller_outputs(
    api_server: ThreadServer, client: httpx.Client
) -> None:
    def request(i: int) -> tuple[str, dict]:
        sampling = {"temperature": 0} if i % 2 else {"temperature": 1.0, "seed": 100 + i}
        if i % 4 < 2:
            return "/v1/completions", {"prompt": f"{PROMPT} caller {i}", "max_tokens": 24, "n": 2, **sampling}
        mode = {"mode": "greedy"} if i % 2 else {"mode": "sample", "top_k": 0, "top_p": 1.0, "seed": 100 + i}
        return "/invocations", {"input": f"{PROMPT} caller {i}", "max_new_tokens": 24,
                                "num_return_sequences": 2, **mode}  # fmt: skip

    def answer(i: int) -> object:
        path, body = request(i)
        r = client.post(path, json=body)
        assert r.status_code == 200, r.text
        data = r.json()
        return [c["text"] for c in data["choices"]] if path.startswith("/v1") else data

    engine = served_engine(api_server)
    alone = [answer(i) for i in range(16)]
    assert wait_idle(engine)
    engine.stats.max_step_batch = 0
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(answer, range(16)))
    assert together == alone
    assert engine.stats.max_step_batch > 1
