"""The SageMaker container contract: boto3 against the server, /ping while loading or after a failed load,
settings from SageMaker's environment variables, and the container entry point."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest
from botocore.config import Config

from gpt2serve.api.container import build_parser, container_settings
from gpt2serve.settings import Settings, add_arguments
from tests.api.conftest import SRC, ThreadServer, make_settings, wait_for

BODY = {"input": "The quick brown fox", "seed": 11, "num_return_sequences": 2, "max_length": 14}


def runtime_client(url: str):
    return boto3.client(
        "sagemaker-runtime",
        region_name="us-east-1",
        endpoint_url=url,
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        config=Config(retries={"max_attempts": 1, "mode": "standard"}),
    )


def test_boto3_invoke_endpoint_equals_plain_post(api_server: ThreadServer, client: httpx.Client) -> None:
    response = runtime_client(api_server.url).invoke_endpoint(
        EndpointName="gpt2-xl-endpoint",
        ContentType="application/json",
        Accept="application/json",
        CustomAttributes="c000b4f9-df62-4c85-a0bf-7c525f9104a4",
        Body=json.dumps(BODY),
    )
    assert response["ContentType"].startswith("application/json")
    assert json.loads(response["Body"].read()) == client.post("/invocations", json=BODY).json()


def test_boto3_jsonlines(api_server: ThreadServer) -> None:
    body = '{"input": "a", "test": true}\n{"input": "b", "length": 3, "seed": 1}\n'
    response = runtime_client(api_server.url).invoke_endpoint(
        EndpointName="gpt2", ContentType="application/jsonlines", Body=body.encode()
    )
    lines = response["Body"].read().decode().splitlines()
    assert [json.loads(line)["input"] for line in lines] == ["a", "b"]


def test_boto3_sees_errors_as_model_error(api_server: ThreadServer) -> None:
    client = runtime_client(api_server.url)
    with pytest.raises(client.exceptions.ModelError) as info:
        client.invoke_endpoint(
            EndpointName="gpt2", ContentType="application/json", Body=b'{"input": "a", "mode": "fast"}'
        )
    error = info.value.response
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 424
    assert error["OriginalStatusCode"] == 400 and "`mode`" in error["Error"]["Message"]
    assert json.loads(error["OriginalMessage"])["error"]["param"] == "mode"


def test_runtime_path_answers_424_where_the_container_path_answers_the_status(client: httpx.Client) -> None:
    body = {"input": "a", "top_p": 2.0}
    plain = client.post("/invocations", json=body)
    runtime = client.post("/endpoints/gpt2/invocations", json=body)
    assert plain.status_code == 400 and "x-amzn-errortype" not in plain.headers
    assert runtime.status_code == 424 and runtime.headers["x-amzn-errortype"] == "ModelError"
    answer = runtime.json()
    assert answer["OriginalStatusCode"] == 400 and json.loads(answer["OriginalMessage"]) == plain.json()
    assert answer["error"] == plain.json()["error"] and "Received client error (400)" in answer["Message"]
    # A bad Content-Type too; a body over the size limit is refused by the runtime itself: 413.
    text = client.post("/endpoints/gpt2/invocations", content=b"{}", headers={"content-type": "text/plain"})
    assert text.status_code == 424 and text.json()["OriginalStatusCode"] == 415
    big = client.post("/endpoints/gpt2/invocations", json={"input": "a" * 60_000})
    assert big.status_code == 413 and "x-amzn-errortype" not in big.headers


@pytest.fixture(scope="module")
def broken_server() -> Iterator[ThreadServer]:
    server = ThreadServer(make_settings("/nonexistent/gpt2-checkpoint")).start()
    try:
        yield server
    finally:
        server.stop()


def test_failed_load_keeps_ping_503(broken_server: ThreadServer) -> None:
    def load_failed() -> bool:
        r = httpx.get(f"{broken_server.url}/ping")
        return "could not be loaded" in r.json()["error"]["message"]

    wait_for(load_failed, timeout=30, what="the load failure")
    ping = httpx.get(f"{broken_server.url}/ping")
    assert ping.status_code == 503 and ping.headers["retry-after"]
    r = httpx.post(f"{broken_server.url}/invocations", json={"input": "Hello"})
    assert r.status_code == 503
    assert "/nonexistent/gpt2-checkpoint" in r.json()["error"]["message"]
    runtime = httpx.post(f"{broken_server.url}/endpoints/gpt2/invocations", json={"input": "Hello"})
    assert runtime.status_code == 424 and runtime.headers["retry-after"]
    assert runtime.json()["OriginalStatusCode"] == 503


def test_ping_is_503_while_loading_and_sigterm_then_exits_0(process_server) -> None:
    # A 355M-parameter random model takes seconds to build: long enough to see /ping before it is ready.
    server = process_server("--model", "random:gpt2-medium", "--max-batch-size", "1")
    first = server.wait_listening()
    assert first == 503
    r = httpx.post(f"{server.url}/invocations", json={"input": "Hello"})
    assert r.status_code == 503 and "still loading" in r.json()["error"]["message"]
    server.terminate()
    assert server.proc.wait(timeout=30) == 0, server.output()


def test_sagemaker_environment() -> None:
    env = {"SAGEMAKER_BIND_TO_PORT": "9123", "SAGEMAKER_MAX_PAYLOAD_IN_MB": "20", "SAGEMAKER_BATCH": "true"}
    settings = container_settings([], env)  # the container listens on all interfaces, as SageMaker needs
    assert (settings.port, settings.max_body_mb, settings.request_timeout_s) == (9123, 20.0, 590.0)
    assert settings.host == "0.0.0.0"
    assert Settings.from_env({}).port == 8080 and Settings.from_env({}).request_timeout_s == 50.0


def test_flag_beats_environment_beats_default() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    env = {"SAGEMAKER_BIND_TO_PORT": "9123", "GPT2SERVE_MAX_BATCH_SIZE": "8"}
    settings = Settings.from_args(parser.parse_args(["--port", "7000"]), env)
    assert (settings.port, settings.max_batch_size, settings.max_queue) == (7000, 8, 256)


def test_default_model_is_the_sagemaker_model_dir(tmp_path: Path) -> None:
    env = {"GPT2SERVE_MODEL_DIR": str(tmp_path)}
    assert Settings.from_env(env).model == "gpt2-xl"
    (tmp_path / "config.json").write_text("{}")
    assert Settings.from_env(env).model == str(tmp_path)
    assert Settings.from_env({**env, "GPT2SERVE_MODEL": "random:gpt2"}).model == "random:gpt2"


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ValueError, match="GPT2SERVE_MAX_QUEUE"):
        Settings.from_env({"GPT2SERVE_MAX_QUEUE": "lots"})


def test_help_lists_every_setting() -> None:
    text = build_parser().format_help()
    flags = ("--model", "--port", "SAGEMAKER_BIND_TO_PORT", "--max-body-mb", "--shutdown-grace-s", "--dtype")
    for flag in flags:
        assert flag in text


def test_entry_point_runs_other_commands() -> None:
    cmd = [sys.executable, "-m", "gpt2serve.api.container", sys.executable, "-c", "print('other command')"]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, check=True)
    assert out.stdout.strip() == "other command"
