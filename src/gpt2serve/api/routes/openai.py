"""OpenAI-compatible routes under /v1, for the official `openai` client and tools built on it.

- `POST /v1/completions`: legacy completions (see `gpt2serve.api.openai_protocol` for the fields and
  the documented choices), streamed as SSE `data: {text_completion chunk}` events ending with
  `data: [DONE]`; with `stream_options.include_usage` a last chunk with empty `choices` carries `usage`.
- `GET /v1/models`, `GET /v1/models/{id}`: the one served model.
- `POST /v1/chat/completions`: 400, GPT-2 has no chat template.

Errors have OpenAI's shape `{"error": {"message", "type", "param", "code"}}`. A full queue answers 503
with Retry-After (not OpenAI's 429): the same status every route of this server uses for "busy", and
the `openai` client retries both. An error after a stream began is sent as a `data: {"error": ...}`
event, which the `openai` client raises.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gpt2serve.api import content
from gpt2serve.api import openai_protocol as proto
from gpt2serve.api.disconnect import until_disconnected
from gpt2serve.api.errors import APIError, describe, renamed, request_id_of
from gpt2serve.api.state import server_state
from gpt2serve.api.streaming import DONE, SSEResponse, sse_event, text_pieces
from gpt2serve.engine.bridge import EngineBatch
from gpt2serve.engine.request import StreamDelta

router = APIRouter(prefix="/v1")

OWNER = "gpt2serve"
STARTED = int(time.time())  # the `created` time of the model card
CHAT_MESSAGE = (
    "GPT-2 is a plain language model with no chat template, so this server does not serve chat "
    "completions; send a text prompt to POST /v1/completions instead"
)


def openai_error(exc: BaseException, request_id: str) -> JSONResponse:
    """The server's error answer, in OpenAI's field names."""
    return describe(renamed(exc, proto.OPENAI_NAMES), request_id).response()


def _model_card(request: Request) -> dict[str, Any]:
    engine = server_state(request).require_engine()
    return {"id": engine.model_name, "object": "model", "created": STARTED, "owned_by": OWNER}


@router.get("/models")
async def list_models(request: Request) -> JSONResponse:
    try:
        return JSONResponse({"object": "list", "data": [_model_card(request)]})
    except Exception as exc:
        return openai_error(exc, request_id_of(request))


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> JSONResponse:
    try:
        card = _model_card(request)
        if model_id != card["id"]:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {card['id']!r}",
                           "not_found", param="model")  # fmt: skip
        return JSONResponse(card)
    except Exception as exc:
        return openai_error(exc, request_id_of(request))


@router.post("/chat/completions")
async def chat_completions(request: Request) -> JSONResponse:
    return openai_error(APIError(400, CHAT_MESSAGE, param="messages"), request_id_of(request))


async def _read_request(request: Request) -> proto.CompletionRequest:
    if content.request_media_type(request.headers.get("content-type")) != content.JSON:
        raise APIError(415, "send the request as application/json", "unsupported_media_type")
    body = content.parse_json(content.decode_body(await request.body()))
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    if body.get("prompt") is None:
        raise APIError(400, "`prompt` is required", param="prompt")
    return proto.CompletionRequest.model_validate(body)


@router.post("/completions")
async def completions(request: Request) -> Any:
    request_id = request_id_of(request)
    try:
        req = await _read_request(request)
        prompts, params = req.prompts, req.to_params()
        state = server_state(request)
        _check_prompt_count(len(prompts), state.settings.max_prompts_per_request, state.settings.max_queue)
        engine = state.require_engine()
        batch = await EngineBatch.open(engine, prompts, params, stream=bool(req.stream))
    except Exception as exc:
        return openai_error(exc, request_id)
    model = engine.model_name
    if req.stream:
        return SSEResponse(_stream(batch, req, prompts, model, request_id))
    try:
        results = await until_disconnected(request, batch.wait())  # 499 if the client left
    except Exception as exc:
        return openai_error(exc, request_id)
    return JSONResponse(proto.completion(req, results, model, engine.tokenizer))


def _check_prompt_count(count: int, most: int, queue: int) -> None:
    """A `prompt` list longer than the server could ever queue at once is a 400, not a 503 to retry."""
    limit = min(most, max(1, queue))
    if count > limit:
        raise APIError(
            400, f"`prompt` holds {count} prompts; this server takes at most {limit} in one request",
            param="prompt",
        )  # fmt: skip


async def _stream(
    batch: EngineBatch, req: proto.CompletionRequest, prompts: list[str], model: str, request_id: str
) -> AsyncIterator[bytes]:
    """One chunk per new piece of text of each choice; then usage (if asked) and [DONE]."""
    cid, created, n = proto.completion_id(), int(time.time()), req.n or 1
    prefixes = prompts if req.echo else [""] * len(prompts)
    try:
        async with aclosing(text_pieces(batch, prefixes)) as pieces:
            async for k, item in pieces:
                if isinstance(item, StreamDelta):
                    choice = {"text": item.text, "index": k * n + item.index, "logprobs": None,
                              "finish_reason": item.finish_reason}  # fmt: skip
                    yield sse_event(_chunk(cid, created, model, [choice], req.include_usage))
        if req.include_usage:
            final = proto.envelope(cid, created, model, [])
            final["usage"] = proto.usage([r for r in batch.results if r is not None])
            yield sse_event(final)
        yield DONE
    except Exception as exc:
        yield sse_event(json.loads(openai_error(exc, request_id).body))


def _chunk(cid: str, created: int, model: str, choices: list[dict], with_usage: bool) -> dict[str, Any]:
    chunk = proto.envelope(cid, created, model, choices)
    if with_usage:
        chunk["usage"] = None
    return chunk
