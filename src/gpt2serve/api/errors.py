"""One error envelope and one table from exception classes to HTTP statuses.

Every error answer has the body `{"error": {"message": ..., "type": ..., "param": ..., "code": null}}`
(the shape OpenAI clients expect too). Unexpected exceptions become 500 with the request id in the
message and a logged traceback; no traceback ever reaches the client.

Documented choice: a request that runs past `request_timeout_s` gets 504 (the server's own deadline for
its generation backend ran out; 408 would blame the client for sending the request too slowly).

Engine errors name the engine's fields (`n`, `max_new_tokens`, `prompt` ...). Each protocol owns one
table from those names to its own (`SEED_NAMES`, `V1_NAMES`, `OPENAI_NAMES`), applied by `renamed`
where that protocol hands a request to the engine (`speaking`).

`model_error()` answers as the SageMaker runtime service reports a container's error to its callers:
HTTP 424 `ModelError` carrying the container's status and body.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpt2serve.engine.errors import (
    EngineOverloadedError,
    EngineStoppedError,
    InvalidParameterError,
    ModelLoadError,
    NonFiniteLogitsError,
    RequestTimeoutError,
)

logger = logging.getLogger("gpt2serve.api")

RETRY_AFTER_S = "2"


class APIError(Exception):
    """An error the HTTP layer raises itself (bad body, bad headers ...)."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param


class BodyTooLargeError(APIError):
    def __init__(self, limit_bytes: int):
        mb = limit_bytes / 2**20
        message = f"request body is larger than this server's limit of {limit_bytes} bytes ({mb:.3g} MB)"
        super().__init__(413, message, "request_too_large")


@dataclass
class ErrorInfo:
    status: int
    body: dict
    headers: dict[str, str] = field(default_factory=dict)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


def envelope(message: str, type: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": None}}


def renamed(exc: BaseException, names: Mapping[str, str]) -> BaseException:
    """`exc` in a protocol's words: an InvalidParameterError's field (and every backticked engine field
    its message names) renamed by `names` (engine field -> the protocol's); other exceptions as they are."""
    if not isinstance(exc, InvalidParameterError):
        return exc
    message = exc.message
    for ours, theirs in names.items():
        message = message.replace(f"`{ours}`", f"`{theirs}`")
    return InvalidParameterError(names.get(exc.param, exc.param), message)


@contextmanager
def speaking(names: Mapping[str, str]) -> Iterator[None]:
    """Engine parameter errors raised inside the block come out in a protocol's field names."""
    try:
        yield
    except InvalidParameterError as exc:
        raise renamed(exc, names) from None


# exception class -> (status, error type); the first matching row wins.
ERROR_TABLE: tuple[tuple[type[BaseException], int, str], ...] = (
    (InvalidParameterError, 400, "invalid_request_error"),
    (EngineOverloadedError, 503, "overloaded_error"),
    (RequestTimeoutError, 504, "timeout_error"),
    (EngineStoppedError, 503, "service_unavailable"),
    (ModelLoadError, 503, "service_unavailable"),
    (NonFiniteLogitsError, 500, "server_error"),
)

HTTP_TYPES = {
    404: "not_found", 405: "method_not_allowed", 406: "not_acceptable", 415: "unsupported_media_type",
}


def describe(exc: BaseException, request_id: str = "-") -> ErrorInfo:
    """The status, envelope and headers answering `exc`."""
    if isinstance(exc, APIError):
        return ErrorInfo(exc.status, envelope(exc.message, exc.type, exc.param))
    if isinstance(exc, ValidationError):
        return _validation_error(exc.errors())
    if isinstance(exc, RequestValidationError):
        return _validation_error(exc.errors())
    if isinstance(exc, StarletteHTTPException):
        kind = HTTP_TYPES.get(exc.status_code, "invalid_request_error")
        return ErrorInfo(exc.status_code, envelope(str(exc.detail), kind), dict(exc.headers or {}))
    for cls, status, kind in ERROR_TABLE:
        if isinstance(exc, cls):
            param = getattr(exc, "param", None)
            headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else {}
            return ErrorInfo(status, envelope(str(exc) or kind, kind, param), headers)
    logger.error("request %s failed", request_id, exc_info=exc)
    message = f"internal server error (request id {request_id}); the server log has the details"
    return ErrorInfo(500, envelope(message, "server_error"))


def model_error(exc: BaseException, request_id: str = "-") -> JSONResponse:
    """424 ModelError (header `x-amzn-ErrorType: ModelError`) carrying the status and body the container's
    /invocations would have answered, plus the usual `error` object; a 503 keeps its Retry-After."""
    info = describe(exc, request_id)
    original = json.dumps(info.body, ensure_ascii=False)
    side = "client" if info.status < 500 else "server"
    body = {
        **info.body,
        "Message": f'Received {side} error ({info.status}) from primary with message "{original}".',
        "OriginalStatusCode": info.status,
        "OriginalMessage": original,
    }
    headers = {**info.headers, "x-amzn-ErrorType": "ModelError"}
    return JSONResponse(body, status_code=424, headers=headers)


def _validation_error(errors: list[dict]) -> ErrorInfo:
    """400 naming the first bad field, the expected type and the given value."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_type_tag(p)]
    param = ".".join(loc) or None
    name = f"`{param}`" if param else "the request"
    if first.get("type") == "missing":
        message = f"{name} is required"
    else:
        given = first.get("input")
        shown = repr(given) if len(repr(given)) <= 80 else repr(given)[:77] + "..."
        message = f"{name}: {first.get('msg', 'invalid value')}; got {shown} ({_json_type(given)})"
    return ErrorInfo(400, envelope(message, "invalid_request_error", param))


def _is_type_tag(part: object) -> bool:
    """pydantic names the branch of a union in `loc` ("str", "list[str]"); it is not a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none") or "[" in part)


def _json_type(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def request_id_of(request: Request) -> str:
    return getattr(request.state, "request_id", "-")


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    return describe(exc, request_id_of(request)).response()


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception through `describe`."""
    for cls in (APIError, ValidationError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(cls, _handle)
    for cls, _, _ in ERROR_TABLE:
        app.add_exception_handler(cls, _handle)
