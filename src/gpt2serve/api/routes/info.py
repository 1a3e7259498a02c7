"""`GET /info`: what this server serves, as JSON, for the playground page and for people.

    {"version": "0.1.0", "ready": true, "status": null,
     "model": {"name", "parameters", "dtype", "device", "context_length", "random_weights", "layers",
               "heads", "width"},
     "request": {"fields": {<name>: JSON schema of the field, with its default and description}, ...},
                 "required": ["input"], "modes": {<mode>: [fields it reads]}, "default_mode": ...}}

`request` is read from the current request's pydantic model (`SeedRequest`), so its defaults are declared
once. While the model loads (or after it failed to), `ready` is false, `model` is null and `status`
says why.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from fastapi import APIRouter, Request

from gpt2serve import __version__
from gpt2serve.api.protocol import MODE_FIELDS, SeedRequest
from gpt2serve.api.state import server_state
from gpt2serve.engine.engine import Engine

router = APIRouter()


def model_info(engine: Engine) -> dict[str, Any]:
    """The served model's name, size and placement."""
    shape = engine.model_config
    return {
        "name": engine.model_name,
        "parameters": shape.n_params,
        "dtype": engine.dtype,
        "device": str(engine.device),
        "context_length": shape.n_positions,
        "random_weights": engine.is_random,
        "layers": shape.n_layer,
        "heads": shape.n_head,
        "width": shape.n_embd,
    }


@lru_cache(maxsize=1)
def request_info() -> dict[str, Any]:
    """The current request's fields (JSON schema, defaults included) and the fields each mode reads."""
    schema = SeedRequest.model_json_schema()
    return {
        "fields": schema["properties"],
        "required": schema.get("required", []),
        "modes": {mode: list(fields) for mode, fields in MODE_FIELDS.items()},
        "default_mode": SeedRequest.model_fields["mode"].default,
    }


@router.get("/info")
async def info(request: Request) -> dict[str, Any]:
    state = server_state(request)
    engine = state.engine if state.ready else None
    return {
        "version": __version__,
        "ready": engine is not None,
        "status": None if engine is not None else state.unavailable_reason(),
        "model": model_info(engine) if engine is not None else None,
        "request": request_info(),
    }
