"""The SageMaker container routes: /ping, /invocations (also as /endpoints/<name>/invocations, so boto3
and the AWS CLI work with an endpoint URL override) and /execution-parameters for batch transform.

A JSON body asking for a stream (`"stream": true`, or `Accept: text/event-stream`) is answered with
server-sent events (see `gpt2serve.api.streaming`).

JSON Lines bodies: each line is one request, answered on its own line, in order; the lines run through
the engine concurrently (at most `max_batch_size` at once per body). A line that fails validation is
answered with its `{"error": ...}` object and the other lines still run. A line refused because the
server is busy or stopping fails the whole body with 503, so batch transform retries it.

Errors: `/invocations` answers the status of the error (400, 503 ...), as a container does;
`/endpoints/<name>/invocations` answers as the SageMaker runtime service does, with HTTP 424 `ModelError`
whose `OriginalStatusCode` and `OriginalMessage` carry that status and body (boto3 raises ModelError);
a body over the size limit gets 413 on both paths, as the runtime service refuses one itself. The runtime
path's answers carry `x-Amzn-Invoked-Production-Variant`, as the service's do.
A client that disconnects while its non-streamed request runs cancels the generation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any

from fastapi import APIRouter, Request, Response

from gpt2serve.api import content
from gpt2serve.api.disconnect import ClientDisconnectedError, until_disconnected
from gpt2serve.api.errors import APIError, BodyTooLargeError, describe, model_error, request_id_of
from gpt2serve.api.protocol import answer_request
from gpt2serve.api.routes.response_stream import PRODUCTION_VARIANT
from gpt2serve.api.state import ServerState, server_state
from gpt2serve.api.streaming import native_sse_response, wants_stream
from gpt2serve.engine import bridge
from gpt2serve.engine.errors import EngineStoppedError, RequestTimeoutError
from gpt2serve.engine.params import SamplingParams
from gpt2serve.engine.request import GenerationResult

router = APIRouter()


@router.get("/ping")
async def ping(request: Request) -> Response:
    """200 with an empty body once the model serves; 503 while it loads or if it failed to load."""
    state = server_state(request)
    if state.ready:
        return Response(status_code=200)
    return describe(EngineStoppedError(state.unavailable_reason())).response()


@router.get("/execution-parameters")
async def execution_parameters(request: Request) -> dict[str, Any]:
    settings = server_state(request).settings
    return {
        "MaxConcurrentTransforms": settings.max_concurrent_transforms,
        "BatchStrategy": settings.batch_strategy,
        "MaxPayloadInMB": max(1, int(settings.max_body_mb)),  # SageMaker takes whole MB
    }


@router.post("/invocations")
async def invocations(request: Request) -> Response:
    """The container's inference call: errors answer with their own status."""
    return await _invoke(request)


@router.post("/endpoints/{endpoint_name}/invocations")
async def invoke_endpoint(endpoint_name: str, request: Request) -> Response:
    """The runtime service's InvokeEndpoint: an error is a 424 ModelError carrying the container's answer."""
    try:
        response = await _invoke(request)
    except (BodyTooLargeError, ClientDisconnectedError):
        raise  # the runtime itself refuses a body over its limit with 413, before the model sees it
    except Exception as exc:
        response = model_error(exc, request_id_of(request))
    response.headers["x-Amzn-Invoked-Production-Variant"] = PRODUCTION_VARIANT
    return response


async def _invoke(request: Request) -> Response:
    request_type = content.request_media_type(request.headers.get("content-type"))
    accept = request.headers.get("accept")
    content.check_custom_attributes(request.headers.get("x-amzn-sagemaker-custom-attributes"))
    text = content.decode_body(await request.body())
    state = server_state(request)
    in_batch_job = state.settings.batch_transform  # SAGEMAKER_BATCH=true: newline-joined JSON is JSON Lines
    multi_record = request_type == content.JSON and in_batch_job and content.is_multi_record(text)
    if request_type == content.JSON and not multi_record:
        body = content.parse_json(text)
        if wants_stream(accept, body):  # "stream": true or Accept: text/event-stream
            return await native_sse_response(state, body, request_id_of(request))
        answer_type = content.answer_media_type(accept, request_type)
        answer = await until_disconnected(request, answer_one(state, body))
        return Response(content.render([answer], answer_type, single=True), media_type=answer_type)
    answer_type = content.answer_media_type(accept, request_type)
    lines = content.split_lines(text)
    answers = await until_disconnected(request, _answer_lines(state, lines, request_id_of(request)))
    rendered = content.render(answers, content.JSONLINES if multi_record else answer_type, single=False)
    return Response(rendered, media_type=answer_type)


async def answer_one(state: ServerState, body: Any, deadline: float | None = None) -> Any:
    """Validate one request body, run it, and shape the answer for its format."""

    def generate(prompt: str, params: SamplingParams) -> Awaitable[GenerationResult]:
        return bridge.generate(state.require_engine(), prompt, params, deadline)

    return await answer_request(body, generate)


async def _answer_lines(state: ServerState, lines: list[tuple[int, str]], request_id: str) -> list[Any]:
    """Every line's answer; the lines share one deadline, the body's (request_timeout_s from now)."""
    settings = state.settings
    if len(lines) > settings.max_lines_per_body:
        raise APIError(
            400, f"the JSON Lines body holds {len(lines)} requests; at most {settings.max_lines_per_body}",
            param="body",
        )  # fmt: skip
    limit = asyncio.Semaphore(max(1, settings.max_batch_size))
    deadline = time.monotonic() + settings.request_timeout_s

    async def one(number: int, line: str) -> Any:
        async with limit:
            try:
                if time.monotonic() > deadline:
                    limit_s = settings.request_timeout_s
                    raise RequestTimeoutError(f"the body ran past its {limit_s:g} s deadline")
                return await answer_one(state, content.parse_json(line, line=number), deadline)
            except Exception as exc:
                info = describe(exc, request_id)
                if info.status == 503:
                    raise
                return info.body

    tasks = [asyncio.ensure_future(one(n, line)) for n, line in lines]
    try:
        return await asyncio.gather(*tasks)
    finally:  # after a 503, the other lines need not run on
        for task in tasks:
            task.cancel()
