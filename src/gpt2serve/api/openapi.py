"""The OpenAPI schema (`GET /openapi.json`) with the request bodies the routes read raw.

The invocation routes and `/v1/completions` read `request.body()` themselves (content negotiation, JSON
Lines, hostile-input decoding), so FastAPI cannot infer their bodies. `install_openapi` adds them: the
current and first-generation SageMaker requests (`SeedRequest`, `V1Request`), a JSON Lines body (one such
request per line) and the OpenAI completion request, as components built from the pydantic models, so
clients and fuzzers (schemathesis) can generate requests from the schema.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from gpt2serve.api.content import JSON, JSONLINES
from gpt2serve.api.openai_protocol import CompletionRequest
from gpt2serve.api.protocol import SeedRequest, V1Request

REF = "#/components/schemas/{model}"
NATIVE = {"oneOf": [{"$ref": REF.format(model="SeedRequest")}, {"$ref": REF.format(model="V1Request")}]}
JSON_LINES = {
    "type": "string",
    "description": "JSON Lines: one request (SeedRequest or V1Request) per non-empty line, each answered on "
    "its own line, in order",
}
NATIVE_PATHS = ("/invocations", "/endpoints/{endpoint_name}/invocations")
STREAM_PATH = "/endpoints/{endpoint_name}/invocations-response-stream"
OPENAI_PATH = "/v1/completions"


def _components(models: tuple[type[BaseModel], ...]) -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template=REF)
        schemas.update(schema.pop("$defs", {}))
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
