"""SamplingParams as the seed API builds them for a mode: the engine tests' shorthand for its modes."""

from __future__ import annotations

from gpt2serve.api.protocol import SeedRequest
from gpt2serve.engine.params import SamplingParams


def seed_api_params(mode: str, **fields: object) -> SamplingParams:
    """What a seed-API request of `mode` with these fields (the API's names) decodes with."""
    return SeedRequest(input="-", mode=mode, **fields).to_params()
