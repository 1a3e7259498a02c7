"""Content negotiation and body decoding for /invocations.

Request bodies are JSON (`application/json`, or no Content-Type) or JSON Lines (`application/jsonlines`,
`application/jsonl`, `application/x-jsonlines`: one request per non-empty line). Answers are JSON or
JSON Lines as `Accept` asks; `*/*`, `application/*` or no Accept answer in the request's format.
A JSON Lines body answered as JSON gets a JSON array holding one answer per line.
In a batch transform job (`SAGEMAKER_BATCH=true`), a JSON body of several newline-joined records (what
`SplitType=Line` with `BatchStrategy=MultiRecord` sends, labelled application/json) is JSON Lines, and
is answered one answer per line whatever the Accept type, as SageMaker assembles records by line.
"""

from __future__ import annotations

import json
from typing import Any

from gpt2serve.api import jsondecode
from gpt2serve.api.errors import APIError

JSON = "application/json"
JSONLINES = "application/jsonlines"
JSONLINES_TYPES = (JSONLINES, "application/jsonl", "application/x-jsonlines")
ANY_TYPES = ("*/*", "application/*")
MAX_CUSTOM_ATTRIBUTES = 1024


def media_type(header: str) -> tuple[str, dict[str, str]]:
    """`"Application/JSON; charset=utf-8"` -> `("application/json", {"charset": "utf-8"})`."""
    kind, *rest = header.split(";")
    params = {}
    for item in rest:
        key, _, value = item.partition("=")
        params[key.strip().lower()] = value.strip().strip('"').lower()
    return kind.strip().lower(), params


def request_media_type(content_type: str | None) -> str:
    """The request body's type (JSON or a JSON Lines type), or 415."""
    if not content_type or not content_type.strip():
        return JSON
    kind, params = media_type(content_type)
    charset = params.get("charset", "utf-8")
    if charset not in ("utf-8", "utf8"):
        raise APIError(415, f"request bodies must be UTF-8, got charset={charset}", "unsupported_media_type")
    if kind == JSON or kind in JSONLINES_TYPES:
        return kind
    raise APIError(
        415,
        f"unsupported Content-Type {kind!r}; send {JSON} or {JSONLINES} (one JSON request per line)",
        "unsupported_media_type",
    )


def answer_media_type(accept: str | None, request_type: str) -> str:
    """The first type in `accept` this server can write, or 406."""
    if not accept or not accept.strip():
        return request_type
    for item in accept.split(","):
        kind, params = media_type(item)
        if params.get("q") in ("0", "0.0", "0.00", "0.000"):
            continue
        if kind in ANY_TYPES:
            return request_type
        if kind == JSON or kind in JSONLINES_TYPES:
            return kind
    raise APIError(
        406, f"cannot answer in {accept.strip()!r}; accepted: {JSON}, {JSONLINES}, */*", "not_acceptable"
    )


def check_custom_attributes(value: str | None) -> None:
    """X-Amzn-SageMaker-Custom-Attributes is accepted and ignored, up to SageMaker's 1024 characters."""
    if value is not None and len(value) > MAX_CUSTOM_ATTRIBUTES:
        raise APIError(
            400,
            f"X-Amzn-SageMaker-Custom-Attributes is {len(value)} characters; at most {MAX_CUSTOM_ATTRIBUTES}",
            param="X-Amzn-SageMaker-Custom-Attributes",
        )


def decode_body(body: bytes) -> str:
    """UTF-8 text of the body (a leading byte-order mark is dropped), or 400."""
    if not body.strip():
        raise APIError(400, 'the request body is empty; send a JSON object such as {"input": "Hello"}')
    try:
        return body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise APIError(
            400, f"the request body is not valid UTF-8: byte 0x{body[exc.start]:02x} at offset {exc.start}"
        ) from None


def parse_json(text: str, line: int | None = None) -> Any:
    """The decoded JSON value, or 400 saying what is wrong and where (syntax, depth, number size, lone
    surrogates: see `gpt2serve.api.jsondecode`)."""
    return jsondecode.loads(text, line)


def is_multi_record(text: str) -> bool:
    """Several newline-joined JSON records (not one JSON value that spans lines)."""
    if len(split_lines(text)) < 2:
        return False
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return True
    return False


def split_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) for each non-empty line of a JSON Lines body."""
    # Split on "\n" only: str.splitlines() would also split inside JSON strings holding U+2028 etc.
    return [(i, line.rstrip("\r")) for i, line in enumerate(text.split("\n"), start=1) if line.strip()]


def render(answers: list[Any], answer_type: str, single: bool) -> bytes:
    """JSON: the one answer (or an array of answers for a JSON Lines body); JSON Lines: one per line."""
    if answer_type == JSON:
        value = answers[0] if single else answers
        return json.dumps(value, ensure_ascii=False).encode()
    return "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers).encode()
