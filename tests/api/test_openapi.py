"""GET /openapi.json describes the request bodies of the routes that read their body themselves."""

from __future__ import annotations

import httpx

from gpt2serve.api.openapi import request_bodies


def _resolve(schema: dict, ref: str) -> dict:
    assert ref.startswith("#/components/schemas/")
    return schema["components"]["schemas"][ref.rsplit("/", 1)[1]]


def test_raw_body_routes_have_request_bodies(client: httpx.Client) -> None:
    schema = client.get("/openapi.json").json()
    for path in request_bodies():
        body = schema["paths"][path]["post"]["requestBody"]
        assert body["required"] and "application/json" in body["content"], path
    native = schema["paths"]["/invocations"]["post"]["requestBody"]["content"]
    assert "application/jsonlines" in native
    seed, v1 = (_resolve(schema, s["$ref"]) for s in native["application/json"]["schema"]["anyOf"])
    assert seed["required"] == ["input"] and seed["properties"]["num_return_sequences"]["maximum"] == 16
    assert "length" in v1["properties"] and "test" in v1["properties"]
    openai = schema["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]
    completion = _resolve(schema, openai["schema"]["$ref"])
    assert completion["required"] == ["prompt"]
    assert completion["properties"]["stream_options"]["anyOf"][0]["$ref"].endswith("StreamOptions")
    assert "StreamOptions" in schema["components"]["schemas"]


def test_every_ref_resolves(client: httpx.Client) -> None:
    schema = client.get("/openapi.json").json()
    refs: list[str] = []
    stack: list = [schema]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            refs += [v for k, v in item.items() if k == "$ref"]
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    assert refs and all(_resolve(schema, ref) for ref in refs)
