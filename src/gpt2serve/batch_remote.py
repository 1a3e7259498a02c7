"""Answers from a running server for `gpt2serve batch --url`: each line one HTTP request (httpx).

A base URL sends seed-API lines to `<url>/invocations` and OpenAI-style lines to `<url>/v1/completions`;
a URL ending in `/invocations` (a SageMaker runtime path `/endpoints/<name>/invocations`, say) takes
every line. A 424 ModelError from a runtime path is unwrapped: the line's error record is the
container's own error object. Busy answers (503, 429) and broken connections are retried with backoff;
after `RETRIES` tries the job stops (FatalLineError) so that a rerun resumes there.
Generated tokens are counted from `usage` (OpenAI) or by tokenizing the continuations with the bundled
GPT-2 tokenizer (the seed API does not report them).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from gpt2serve.batch import FatalLineError, RemoteError, is_openai

RETRIES = 8
BACKOFF_S = 0.5
BUSY = (429, 503)
TIMEOUT_S = 600.0


class RemoteBatch:
    def __init__(self, url: str, timeout_s: float = TIMEOUT_S):
        url = url.rstrip("/")
        if url.endswith("/invocations"):
            self.seed_url = self.openai_url = url
        else:
            self.seed_url, self.openai_url = f"{url}/invocations", f"{url}/v1/completions"
        self.client = httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(max_connections=None))
        self._tokenizer = None

    async def close(self) -> None:
        await self.client.aclose()

    async def answer(self, body: Any) -> tuple[Any, int]:
        openai = is_openai(body) and self.openai_url != self.seed_url
        data = await self._post(self.openai_url if openai else self.seed_url, body)
        return data, self._tokens(body, data)

    async def _post(self, url: str, body: Any) -> Any:
        problem = ""
        for attempt in range(RETRIES):
            if attempt:
                await asyncio.sleep(BACKOFF_S * 2 ** min(attempt - 1, 4))
            try:
                response = await self.client.post(url, json=body, headers={"Accept": "application/json"})
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
                continue
            data = _json(response)
            status = data.get("OriginalStatusCode", response.status_code) if isinstance(data, dict) else 0
            if response.status_code in BUSY or status in BUSY:
                problem = f"HTTP {response.status_code} (busy)"
                continue
            if response.status_code == 200:
                return data
            if isinstance(data, dict) and isinstance(data.get("error"), dict):
                raise RemoteError({"error": data["error"]})
            raise RemoteError({"error": {"message": f"HTTP {response.status_code}: {response.text[:200]}",
                                         "type": "server_error", "param": None, "code": None}})  # fmt: skip
        raise FatalLineError(f"{url} did not answer after {RETRIES} tries ({problem})")

    def _tokens(self, body: Any, data: Any) -> int:
        if isinstance(data, dict) and isinstance(data.get("usage"), dict):
            return int(data["usage"].get("completion_tokens", 0))
        prompt = body.get("input", "") if isinstance(body, dict) else ""
        if isinstance(data, list):  # the seed API: prompt + continuation
            texts = [t[len(prompt):] if isinstance(t, str) else "" for t in data]
        elif isinstance(data, dict) and isinstance(data.get("output"), list):  # first-generation format
            texts = [t for t in data["output"] if isinstance(t, str)]
        else:
            return 0
        return sum(len(self.tokenizer.encode(t)) for t in texts if t)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from gpt2serve.engine.tokenizer import Tokenizer

            self._tokenizer = Tokenizer.bundled()
        return self._tokenizer


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None
