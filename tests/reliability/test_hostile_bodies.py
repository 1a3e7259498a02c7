"""hypothesis builds hostile JSON bodies (tiny and huge floats, NaN and infinities, integer literals of
thousands of digits, deep nesting, lone surrogates, wrong types, long strings within the body limit) for
every route that reads a body; none may be answered with a 5xx (see `verdict`)."""

from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability.conftest import BODY_MB
from tests.reliability.verdict import server_error

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))  # per route; more for a longer campaign
SEEN = collections.Counter()
NATIVE_FIELDS = (
    "input", "max_length", "max_new_tokens", "num_return_sequences", "mode", "top_p", "top_k", "temperature",
    "num_beams", "no_repeat_ngram_size", "seed", "stop", "repetition_penalty", "stream", "length", "k", "p",
    "stop_token", "test",
)  # fmt: skip
OPENAI_FIELDS = (
    "prompt", "model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options",
    "logprobs", "echo", "stop", "presence_penalty", "frequency_penalty", "best_of", "logit_bias", "seed",
    "user", "suffix",
)  # fmt: skip


@dataclass(frozen=True)
class Raw:
    """JSON text put into the body as it is (what json.dumps will not write)."""

    text: str


def to_json(value: object) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, list):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{to_json(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)  # ensure_ascii: a lone surrogate is written as its \\uXXXX escape


MAX_STRING = int(BODY_MB * 2**20 / 16)  # up to 12 bytes a character once escaped; a few in one body
raw_values = st.one_of(
    st.integers(300, 6000).map(lambda n: Raw("1" + "0" * n)),  # past int's 4,300-digit limit too
    st.integers(20, 3000).map(lambda n: Raw("[" * n + "]" * n)),
    st.sampled_from(["1e999", "-1e999", "1e-400", "-0", "0.0e0", "NaN", "Infinity", "-Infinity", "1E+308",
                     "123456789012345678901234567890"]).map(Raw),
)  # fmt: skip
strings = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["\ud800", "a\udfffb", "\ud83d", "", " ", "\x00", "\u2028", "😀" * 5, "<|endoftext|>"]),
    st.tuples(st.integers(1000, MAX_STRING), st.sampled_from("aé😀 \n")).map(lambda t: t[1] * t[0]),
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-5, 200),
    st.floats(allow_nan=False, allow_infinity=False), st.floats(-1e-300, 1e-300), strings, raw_values,
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)


def bodies(fields: tuple[str, ...], prompt: str) -> st.SearchStrategy[str]:
    """A JSON object with some of `fields` (the prompt field usually a short valid string), or now and
    then something that is not an object at all."""
    obj = st.fixed_dictionaries(
        {prompt: st.one_of(st.text(min_size=1, max_size=12), values)},
        optional={name: values for name in fields if name != prompt},
    )
    return st.one_of(obj.map(to_json), obj.map(to_json), values.map(to_json))


def _post(url: str, path: str, body: str, content_type: str = "application/json") -> tuple[int, str]:
    r = httpx.post(url + path, content=body.encode("utf-8", "surrogatepass"),
                   headers={"content-type": content_type}, timeout=60)  # fmt: skip
    return r.status_code, r.content.decode("utf-8", "replace")


ROUTES = [
    ("/invocations", NATIVE_FIELDS, "input", "application/json"),
    ("/invocations", NATIVE_FIELDS, "input", "application/jsonlines"),
    ("/endpoints/fuzz/invocations", NATIVE_FIELDS, "input", "application/json"),
    ("/endpoints/fuzz/invocations-response-stream", NATIVE_FIELDS, "input", "application/json"),
    ("/v1/completions", OPENAI_FIELDS, "prompt", "application/json"),
]


@pytest.mark.slow
@pytest.mark.parametrize("path, fields, prompt, content_type", ROUTES)
def test_no_hostile_body_gets_a_server_error(fuzz_server, path, fields, prompt, content_type) -> None:
    one_body = bodies(fields, prompt)
    lines = st.lists(one_body, min_size=1, max_size=4).map("\n".join)
    strategy = lines if "lines" in content_type else one_body

    @given(body=strategy)
    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def run(body: str) -> None:
        status, text = _post(fuzz_server.url, path, body, content_type)
        SEEN[(path, content_type, status)] += 1
        if server_error(status, text):
            raise AssertionError((body[:300], status, text[:300]))

    run()


@pytest.fixture(scope="module", autouse=True)
def summary():
    """Prints what was sent and answered (run with -s to see it)."""
    yield
    print(f"\nhypothesis: {sum(SEEN.values())} requests; (path, type, status): {dict(SEEN)}")
