"""gpt2serve.Client against a live server, over HTTP and through boto3's sagemaker-runtime; `invoke`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpt2serve import Client
from gpt2serve.client import InvalidRequestError, ServerBusyError, ServerError, error_from
from tests.api.conftest import ThreadServer
from tests.live_server import tiny_server

SRC = Path(__file__).resolve().parents[1] / "src"
SEEDED = {"max_new_tokens": 6, "seed": 3, "num_return_sequences": 1}
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
}  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[ThreadServer]:
    with tiny_server(tiny_checkpoint) as s:
        yield s


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(params=["http", "sagemaker"])
def client(request, server, aws_env) -> Iterator[Client]:
    if request.param == "http":
        c = Client(server.url)
    else:  # real boto3, its endpoint URL pointed at the live server
        c = Client.sagemaker("gpt-2", region="us-east-1", endpoint_url=server.url)
    with c:
        yield c


def test_generate_and_stream_agree(client):
    texts = client.generate("Hello there", **SEEDED)
    assert len(texts) == 1 and texts[0].startswith("Hello there")
    pieces = list(client.stream("Hello there", **SEEDED))
    assert len(pieces) > 1 and "".join(pieces) == texts[0]
    assert len(client.generate("Hello", max_new_tokens=2)) == 3  # the API's default count


def test_errors_are_typed_and_carry_the_servers_message(client):
    with pytest.raises(InvalidRequestError) as info:
        client.generate("Hi", top_p=1.5)
    assert info.value.status == 400 and info.value.param == "top_p"
    assert "`top_p` must be in (0, 1], got 1.5" in info.value.message
    with pytest.raises(InvalidRequestError, match="mode"):
        list(client.stream("Hi", mode="bogus"))


def test_error_types_by_status():
    body = {"error": {"message": "busy", "type": "overloaded_error", "param": None}}
    assert isinstance(error_from(503, body), ServerBusyError)
    assert isinstance(error_from(500, body), ServerError)
    assert isinstance(error_from(None, "not json"), ServerError)


def test_import_is_light():
    code = "import sys, gpt2serve; gpt2serve.Client; print(sorted({'torch', 'fastapi'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, **extra}


def _invoke(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "gpt2serve.cli", "invoke", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or _env(), timeout=120)


def test_invoke_command_over_http_and_sagemaker(server):
    flags = ["--max-new-tokens", "6", "--seed", "3", "--num-return-sequences", "1"]
    plain = _invoke("Hello there", "--url", server.url, *flags)
    assert plain.returncode == 0, plain.stderr
    streamed = _invoke("Hello there", "--endpoint-name", "gpt-2", "--stream", *flags,
                       env=_env(**AWS_ENV, AWS_ENDPOINT_URL=server.url))  # fmt: skip
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == plain.stdout and plain.stdout.startswith("Hello there")
    bad = _invoke("Hi", "--url", server.url, "--top-p", "1.5")
    assert bad.returncode == 2 and "`top_p` must be in (0, 1], got 1.5" in bad.stderr
