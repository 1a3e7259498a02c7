"""The OpenAPI schema (`GET /openapi.json`) with the request bodies the routes read raw.

The invocation routes and `/v1/completions` read `request.body()` themselves (content negotiation, JSON
Lines, hostile-input decoding), so FastAPI cannot infer their bodies. `install_openapi` adds them: the
current and first-generation SageMaker requests (`SeedRequest`, `V1Request`), a JSON Lines body (one such
request per line) and the OpenAI completion request, as components built from the pydantic models, so
clients and fuzzers (schemathesis) can generate requests from the schema. `BOUNDS` documents the ranges
`SamplingParams` enforces (the schema only describes them; validation stays there).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from gpt2serve.api.content import JSON, JSONLINES
from gpt2serve.api.openai_protocol import CompletionRequest
from gpt2serve.api.protocol import Mode, SeedRequest, V1Request
from gpt2serve.engine.params import MAX_BEAMS, MAX_RETURN_SEQUENCES, MAX_SEED, MAX_STOP_STRINGS

REF = "#/components/schemas/{model}"
NATIVE = {"anyOf": [{"$ref": REF.format(model="SeedRequest")}, {"$ref": REF.format(model="V1Request")}]}
JSON_LINES = {
    "type": "string",
    "description": "JSON Lines: one request (SeedRequest or V1Request) per non-empty line, each answered on "
    "its own line, in order",
}
NATIVE_PATHS = ("/invocations", "/endpoints/{endpoint_name}/invocations")
STREAM_PATH = "/endpoints/{endpoint_name}/invocations-response-stream"
OPENAI_PATH = "/v1/completions"

POSITIVE = {"exclusiveMinimum": 0}
AT_LEAST_1 = {"minimum": 1}
SEQUENCES = {"minimum": 1, "maximum": MAX_RETURN_SEQUENCES}
SEED = {"minimum": -1, "maximum": MAX_SEED}
PROBABILITY = {"exclusiveMinimum": 0, "maximum": 1}
PROMPT = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]}
STOP = {"maxItems": MAX_STOP_STRINGS}
BOUNDS: dict[str, dict[str, dict[str, Any]]] = {
    "SeedRequest": {
        "input": {"minLength": 1}, "max_length": AT_LEAST_1, "max_new_tokens": AT_LEAST_1,
        "num_return_sequences": SEQUENCES, "mode": {"enum": [m.value for m in Mode]}, "top_p": PROBABILITY,
        "top_k": {"minimum": 0}, "temperature": POSITIVE, "num_beams": {"minimum": 1, "maximum": MAX_BEAMS},
        "no_repeat_ngram_size": {"minimum": 0}, "seed": SEED, "stop": STOP, "repetition_penalty": POSITIVE,
    },
    "V1Request": {
        "input": {"minLength": 1}, "length": AT_LEAST_1, "num_return_sequences": SEQUENCES,
        "temperature": POSITIVE, "k": {"minimum": 0}, "p": PROBABILITY, "repetition_penalty": POSITIVE,
        "seed": SEED,
    },
    "CompletionRequest": {
        "prompt": PROMPT,
        "max_tokens": AT_LEAST_1, "temperature": {"minimum": 0, "maximum": 2}, "top_p": PROBABILITY,
        "n": SEQUENCES, "logprobs": {"minimum": 0, "maximum": 5}, "seed": {"minimum": 0, "maximum": MAX_SEED},
        "stop": STOP,
    },
}  # fmt: skip


def _components(models: tuple[type[BaseModel], ...]) -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template=REF)
        schemas.update(schema.pop("$defs", {}))
        for name, bounds in BOUNDS.get(model.__name__, {}).items():
            schema["properties"][name].update(bounds)
        if model is CompletionRequest:
            schema["required"] = ["prompt"]
        schemas[model.__name__] = schema
    return schemas


def _body(content: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {kind: {"schema": schema} for kind, schema in content.items()}}


def request_bodies() -> dict[str, dict[str, Any]]:
    """The requestBody object of each route that reads its body itself."""
    native = _body({JSON: NATIVE, JSONLINES: JSON_LINES})
    bodies = {path: native for path in NATIVE_PATHS}
    bodies[STREAM_PATH] = _body({JSON: NATIVE})
    bodies[OPENAI_PATH] = _body({JSON: {"$ref": REF.format(model="CompletionRequest")}})
    return bodies


def install_openapi(app: FastAPI) -> None:
    """Make `app.openapi()` describe the raw-body routes' requests."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(_components((SeedRequest, V1Request, CompletionRequest)))
            for path, body in request_bodies().items():
                operation = schema["paths"].get(path, {}).get("post")
                if operation is not None:
                    operation["requestBody"] = body
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
