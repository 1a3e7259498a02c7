"""`POST /endpoints/{name}/invocations-response-stream`: the SageMaker runtime's
InvokeEndpointWithResponseStream, so boto3 and the AWS CLI can stream from gpt2serve with an endpoint URL
override.

The body is the native request; the answer is the native SSE stream (see `gpt2serve.api.streaming`), each
SSE event wrapped in one `PayloadPart` event of the AWS event-stream framing, as SageMaker wraps each chunk
a container sends. Headers as the runtime service sends them: `X-Amzn-SageMaker-Content-Type` (the
inner stream's type, text/event-stream) and `x-Amzn-Invoked-Production-Variant`.

Errors, as the runtime service reports a container's errors:
- before the stream starts (bad request, busy, loading): HTTP 424 `ModelError` (header
  `x-amzn-ErrorType: ModelError`) whose body carries `OriginalStatusCode` and `OriginalMessage` (the
  status and JSON body `/invocations` would have answered), plus the usual `error` object; a 503 keeps
  its Retry-After header. boto3 raises `ModelError`. (A body over the size limit gets 413, as the runtime
  service refuses one itself.)
- after it started: a `ModelStreamError` event (ErrorCode `ModelInvocationTimeExceeded` for a request that
  ran past its deadline, else `StreamBroken`); boto3 raises it while the caller iterates.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response

from gpt2serve.api import content, eventstream
from gpt2serve.api.errors import APIError, BodyTooLargeError, describe, model_error, request_id_of
from gpt2serve.api.state import server_state
from gpt2serve.api.streaming import SSE_MEDIA_TYPE, SSEResponse, open_native_stream
from gpt2serve.engine.errors import RequestTimeoutError

router = APIRouter()

PRODUCTION_VARIANT = "AllTraffic"


@router.post("/endpoints/{endpoint_name}/invocations-response-stream")
async def invoke_with_response_stream(endpoint_name: str, request: Request) -> Response:
    request_id = request_id_of(request)
    try:
        if content.request_media_type(request.headers.get("content-type")) != content.JSON:
            message = "a streamed invocation takes one JSON request (Content-Type application/json)"
            raise APIError(415, message, "unsupported_media_type")
        content.check_custom_attributes(request.headers.get("x-amzn-sagemaker-custom-attributes"))
        body = content.parse_json(content.decode_body(await request.body()))
        chunks = await open_native_stream(server_state(request), body)
    except BodyTooLargeError:
        raise  # the runtime itself refuses a body over its limit with 413
    except Exception as exc:
        return model_error(exc, request_id)
    headers = {
        "X-Amzn-SageMaker-Content-Type": SSE_MEDIA_TYPE,
        "x-Amzn-Invoked-Production-Variant": PRODUCTION_VARIANT,
    }
    return SSEResponse(_framed(chunks, request_id), headers=headers, media_type=eventstream.CONTENT_TYPE)


async def _framed(chunks: AsyncIterator[bytes], request_id: str) -> AsyncIterator[bytes]:
    """Each SSE chunk as a PayloadPart event; a failure after the start as a ModelStreamError event."""
    try:
        async for chunk in chunks:
            yield eventstream.payload_part(chunk)
    except Exception as exc:
        message = describe(exc, request_id).body["error"]["message"]
        timed_out = isinstance(exc, RequestTimeoutError)
        code = eventstream.TIMEOUT_CODE if timed_out else eventstream.BROKEN_CODE
        yield eventstream.model_stream_error(message, code)
    finally:
        await chunks.aclose()
