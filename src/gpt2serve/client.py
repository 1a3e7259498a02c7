"""A Python client for a gpt2serve server or a SageMaker endpoint serving it.

    from gpt2serve import Client
    client = Client("http://127.0.0.1:8080")            # a gpt2serve server (POST /invocations)
    client = Client.sagemaker("gpt-2", region="us-east-1")  # boto3's sagemaker-runtime
    client.generate("Once upon a time", max_new_tokens=20)  # -> list[str], the prompt + continuation
    for piece in client.stream("Once upon a time"):         # text pieces as the model makes them
        print(piece, end="", flush=True)

Requests are the seed API's (docs/API.md §1): keyword arguments are its fields (`mode`, `max_new_tokens`,
`seed`, `stop` ...). `stream` asks one sequence unless `num_return_sequences` says otherwise (the pieces of
several sequences then interleave; `stream_indexed` tells them apart). The first piece begins with the
prompt, so the pieces join to `generate`'s string. Errors raise `ClientError` subclasses carrying the
server's message, status, type and field (`param`); a SageMaker ModelError is unwrapped to the
container's own error. This module imports no torch (httpx; boto3 only for `Client.sagemaker`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import httpx

DEFAULT_TIMEOUT_S = 120.0
JSON = "application/json"


class ClientError(Exception):
    """An error answer; `status` is the server's HTTP status (the container's, behind SageMaker)."""

    def __init__(self, message: str, status: int | None = None, type: str | None = None,
                 param: str | None = None):  # fmt: skip
        super().__init__(message)
        self.message, self.status, self.type, self.param = message, status, type, param


class InvalidRequestError(ClientError):
    """The request was refused (4xx): `param` names the field."""


class ServerBusyError(ClientError):
    """The server is busy, loading or stopping (503, 429): retry later."""


class ServerError(ClientError):
    """The server failed (5xx), or a stream broke after it began."""


def error_from(status: int | None, body: Any) -> ClientError:
    """The typed error for an error answer and its `{"error": {...}}` body."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        error = {"message": str(body)[:500] or f"HTTP {status}"}
    cls = ServerError
    if status in (429, 503):
        cls = ServerBusyError
    elif status is not None and 400 <= status < 500:
        cls = InvalidRequestError
    return cls(str(error.get("message")), status, error.get("type"), error.get("param"))


def sse_events(chunks: Iterable[bytes]) -> Iterator[tuple[str | None, Any]]:
    """(event name, decoded data) of each server-sent event in a byte stream."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        while b"\n\n" in buffer:
            raw, buffer = buffer.split(b"\n\n", 1)
            event, data = None, []
            for line in raw.decode("utf-8").split("\n"):
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip())
            if data:
                yield event, json.loads("\n".join(data))


class HTTPTransport:
    """POST /invocations on a gpt2serve server."""

    def __init__(self, url: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s)

    def invoke(self, body: dict) -> Any:
        response = self.http.post("/invocations", json=body, headers={"Accept": JSON})
        data = _json(response.content)
        if response.status_code != 200:
            raise error_from(response.status_code, data)
        return data

    def stream(self, body: dict) -> Iterator[bytes]:
        with self.http.stream("POST", "/invocations", json=body) as response:
            if response.status_code != 200:
                raise error_from(response.status_code, _json(response.read()))
            yield from response.iter_bytes()

    def close(self) -> None:
        self.http.close()


class SageMakerTransport:
    """InvokeEndpoint and InvokeEndpointWithResponseStream through boto3's sagemaker-runtime client."""

    def __init__(self, runtime: Any, endpoint_name: str):
        self.runtime, self.endpoint_name = runtime, endpoint_name

    def _args(self, body: dict) -> dict[str, Any]:
        return {"EndpointName": self.endpoint_name, "Body": json.dumps(body), "ContentType": JSON}

    def invoke(self, body: dict) -> Any:
        with _unwrapped():
            response = self.runtime.invoke_endpoint(**self._args(body), Accept=JSON)
            return _json(response["Body"].read())

    def stream(self, body: dict) -> Iterator[bytes]:
        with _unwrapped():
            response = self.runtime.invoke_endpoint_with_response_stream(**self._args(body))
            for event in response["Body"]:
                if "PayloadPart" in event:
                    yield event["PayloadPart"]["Bytes"]
                elif "ModelStreamError" in event:  # botocore usually raises it; in case it does not
                    raise ServerError(event["ModelStreamError"].get("Message", "the stream broke"))

    def close(self) -> None:
        self.runtime.close()


class _unwrapped:
    """Turns botocore's errors into ClientErrors: a ModelError into the container's own error."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        from botocore.exceptions import BotoCoreError
        from botocore.exceptions import ClientError as BotoClientError

        if isinstance(exc, BotoClientError):
            response = exc.response
            if "OriginalStatusCode" in response:
                raise error_from(int(response["OriginalStatusCode"]), _json(response.get("OriginalMessage")))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            message = response.get("Error", {}).get("Message") or str(exc)
            cls = ServerError if (status or 500) >= 500 or "Stream" in exc.__class__.__name__ else ClientError
            raise cls(message, status, response.get("Error", {}).get("Code")) from exc
        if isinstance(exc, BotoCoreError):
            raise ClientError(str(exc)) from exc
        return False


def _json(raw: bytes | str | None) -> Any:
    try:
        return json.loads(raw or b"null")
    except ValueError:
        return raw.decode(errors="replace") if isinstance(raw, bytes) else raw


class Client:
    """generate / stream against one server or endpoint (see the module docstring)."""

    def __init__(self, url: str, timeout_s: float = DEFAULT_TIMEOUT_S, transport: Any = None):
        self.transport = transport or HTTPTransport(url, timeout_s)

    @classmethod
    def sagemaker(cls, endpoint_name: str, region: str | None = None, *, session: Any = None,
                  endpoint_url: str | None = None, **client_kwargs: Any) -> Client:  # fmt: skip
        """A client of a SageMaker endpoint; credentials and region as boto3 finds them (or `session`)."""
        import boto3

        factory = session or boto3.session.Session()
        with _unwrapped():
            runtime = factory.client("sagemaker-runtime", region_name=region, endpoint_url=endpoint_url,
                                     **client_kwargs)  # fmt: skip
        return cls("", transport=SageMakerTransport(runtime, endpoint_name))

    def generate(self, text: str, **params: Any) -> list[str]:
        """The seed API's answer: one string per sequence, each the prompt and its continuation."""
        return self.transport.invoke({"input": text, **params, "stream": False})

    def stream_indexed(self, text: str, **params: Any) -> Iterator[tuple[int, str]]:
        """(sequence index, text piece) as the server streams them."""
        body = {"input": text, "num_return_sequences": 1, **params, "stream": True}
        for event, data in sse_events(self.transport.stream(body)):
            if event == "error":
                raise error_from(None, data)
            if event == "done":
                return
            if event is None and isinstance(data, dict) and data.get("text"):
                yield int(data.get("index", 0)), data["text"]

    def stream(self, text: str, **params: Any) -> Iterator[str]:
        """Text pieces as the model makes them; joined they equal `generate`'s string."""
        for _, piece in self.stream_indexed(text, **params):
            yield piece

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
