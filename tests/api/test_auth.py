"""Who may call, against a live server with API keys and SigV4 credentials: boto3, the AWS CLI,
aws-requests-auth and the openai client with right and wrong credentials, stale, altered and mis-scoped
signatures, unsigned requests, the open paths, per-key quotas on the wire and on /metrics, CORS."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from unittest import mock

import boto3
import httpx
import openai
import pytest
import requests
from aws_requests_auth.aws_auth import AWSRequestsAuth
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from gpt2serve.api.app import create_app
from gpt2serve.api.auth import (
    AuthConfigError,
    key_digest,
    load_auth_config,
    parse_credentials_file,
    parse_keys_file,
    short_hash,
)
from gpt2serve.api.container import container_settings
from gpt2serve.api.quotas import Quota
from gpt2serve.settings import Settings, add_arguments
from tests.api.conftest import SMALL_BODY_MB, SRC, ThreadServer, free_port, make_settings, serving, wait_for

AKID, SECRET = "AKIDGPT2SERVETEST", "s3cr3t/Key+ForTheSigV4TestsOnly0123456789"
ALICE, BOB, CAROL, DAVE = (
    "alice-0123456789abcdef",
    "bob-0123456789abcdef",
    "carol-0123456789ab",
    "dave-0123456789abcd",
)
ORIGIN = "http://playground.example"
BODY = {"input": "The quick brown fox", "seed": 3, "num_return_sequences": 1, "max_length": 10}
RUNTIME = "/endpoints/gpt2/invocations"


@pytest.fixture(scope="module")
def secured(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    files = tmp_path_factory.mktemp("auth")
    keys = files / "keys.txt"
    keys.write_text(
        f"# key name quotas\n{ALICE} alice\n{BOB} bob\n{CAROL} carol requests_per_minute=2\n"
        f"{DAVE} dave tokens_per_minute=3\n"
    )
    credentials = files / "credentials"
    credentials.write_text(f"[ci]\naws_access_key_id = {AKID}\naws_secret_access_key = {SECRET}\n")
    settings = make_settings(
        str(tiny_checkpoint), api_keys_file=str(keys), sigv4_credentials=str(credentials),
        cors_origins=(ORIGIN,), max_body_mb=SMALL_BODY_MB,
    )  # fmt: skip
    with serving(settings) as server:
        yield server


def runtime_client(url: str, secret: str = SECRET, akid: str = AKID):
    return boto3.client(
        "sagemaker-runtime", region_name="eu-central-1", endpoint_url=url, aws_access_key_id=akid,
        aws_secret_access_key=secret, config=Config(retries={"max_attempts": 1, "mode": "standard"}),
    )  # fmt: skip


def invoke(client) -> list[str]:
    answer = client.invoke_endpoint(
        EndpointName="gpt2", ContentType="application/json", Body=json.dumps(BODY)
    )
    return json.loads(answer["Body"].read())


def client_error(call) -> ClientError:
    with pytest.raises(ClientError) as info:
        call()
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    return info.value


def test_boto3_with_the_right_secret_succeeds(secured: ThreadServer) -> None:
    texts = invoke(runtime_client(secured.url))
    assert len(texts) == 1 and texts[0].startswith(BODY["input"])
    stream = runtime_client(secured.url).invoke_endpoint_with_response_stream(
        EndpointName="gpt2",
        ContentType="application/json",
        Body=json.dumps({"input": "Hi", "max_new_tokens": 4}),
    )
    assert b"".join(e["PayloadPart"]["Bytes"] for e in stream["Body"] if "PayloadPart" in e)


def test_boto3_with_a_wrong_secret_or_key_id_gets_the_aws_errors(secured: ThreadServer) -> None:
    error = client_error(lambda: invoke(runtime_client(secured.url, secret="wrong" + SECRET)))
    assert error.response["Error"]["Code"] == "InvalidSignatureException"
    assert "signature we calculated does not match" in error.response["Error"]["Message"]
    error = client_error(lambda: invoke(runtime_client(secured.url, akid="AKIDUNKNOWN")))
    assert error.response["Error"]["Code"] == "UnrecognizedClientException"


def test_boto3_request_signed_20_minutes_ago_is_refused(secured: ThreadServer) -> None:
    past = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(minutes=20)
    client = runtime_client(secured.url)
    with mock.patch("botocore.auth.get_current_datetime", return_value=past):
        error = client_error(lambda: invoke(client))
    assert error.response["Error"]["Code"] == "InvalidSignatureException"


def aws_cli(url: str, secret: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": AKID, "AWS_SECRET_ACCESS_KEY": secret,
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}  # fmt: skip
    aws = Path(sys.executable).with_name("aws")
    command = [str(aws), "sagemaker-runtime", "invoke-endpoint", "--endpoint-url", url, "--region",
               "us-west-2", "--endpoint-name", "gpt2", "--content-type", "application/json",
               "--body", json.dumps(BODY), str(out)]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(not Path(sys.executable).with_name("aws").exists(), reason="awscli is not installed")
def test_aws_cli_with_right_and_wrong_secret(secured: ThreadServer, tmp_path: Path) -> None:
    done = aws_cli(secured.url, SECRET, tmp_path / "out.json")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out.json").read_text())[0].startswith(BODY["input"])
    refused = aws_cli(secured.url, "wrong", tmp_path / "no.json")
    assert refused.returncode != 0 and "(InvalidSignatureException)" in refused.stderr


def signed_with_requests(url: str, path: str, secret: str = SECRET, service: str = "sagemaker", **kw):
    auth = AWSRequestsAuth(AKID, secret, url.removeprefix("http://"), "us-east-1", service)
    return requests.post(f"{url}{path}", json=BODY, auth=auth, timeout=60, **kw)


def test_aws_requests_auth_signed_requests_pass(secured: ThreadServer) -> None:
    for path in (RUNTIME, "/invocations"):
        answer = signed_with_requests(secured.url, path)
        assert answer.status_code == 200 and answer.json()[0].startswith(BODY["input"])


def test_another_service_name_is_refused(secured: ThreadServer) -> None:
    runtime = signed_with_requests(secured.url, RUNTIME, service="execute-api")
    assert runtime.status_code == 403 and runtime.headers["x-amzn-ErrorType"] == "InvalidSignatureException"
    plain = signed_with_requests(secured.url, "/invocations", service="execute-api")
    assert plain.status_code == 403 and "x-amzn-ErrorType" not in plain.headers
    assert plain.json()["error"]["message"] == "the request's credential was not accepted"


def botocore_signed(url: str, body: bytes) -> AWSRequest:
    request = AWSRequest("POST", f"{url}{RUNTIME}", data=body, headers={"Content-Type": "application/json"})
    SigV4Auth(Credentials(AKID, SECRET), "sagemaker", "us-east-1").add_auth(request)
    return request


def test_a_body_changed_after_signing_is_refused(secured: ThreadServer) -> None:
    body = json.dumps(BODY).encode()
    request = botocore_signed(secured.url, body)
    headers = dict(request.headers.items())
    assert httpx.post(request.url, content=body, headers=headers).status_code == 200
    changed = body.replace(b"fox", b"cat")
    answer = httpx.post(request.url, content=changed, headers=headers)
    assert answer.status_code == 403 and answer.headers["x-amzn-errortype"] == "InvalidSignatureException"
    # aws-requests-auth sends the body's hash in X-Amz-Content-SHA256: a changed body must not match it.
    prepared = requests.Request("POST", f"{secured.url}{RUNTIME}", json=BODY).prepare()
    AWSRequestsAuth(AKID, SECRET, secured.url.removeprefix("http://"), "us-east-1", "sagemaker")(prepared)
    prepared.body = changed
    prepared.headers["Content-Length"] = str(len(changed))
    assert requests.Session().send(prepared, timeout=60).status_code == 403


def test_a_signed_body_over_the_limit_gets_413_before_its_signature_is_checked(secured: ThreadServer) -> None:
    big = b"x" * int(SMALL_BODY_MB * 2**20 * 2)
    request = botocore_signed(secured.url, big)
    headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}

    def chunks():  # no Content-Length: the limit applies while the body arrives
        yield from (big[i : i + 8192] for i in range(0, len(big), 8192))

    answer = httpx.post(request.url, content=chunks(), headers=headers)
    assert answer.status_code == 413 and answer.json()["error"]["type"] == "request_too_large"


def test_openai_client_with_right_and_wrong_key(secured: ThreadServer) -> None:
    with openai.OpenAI(base_url=f"{secured.url}/v1", api_key=ALICE, max_retries=0, timeout=60) as oai:
        done = oai.completions.create(model="gpt2", prompt="Hello", max_tokens=3, seed=1)
        assert done.choices[0].text and done.usage.completion_tokens <= 3
    with openai.OpenAI(base_url=f"{secured.url}/v1", api_key="sk-wrong", max_retries=0, timeout=60) as oai:
        with pytest.raises(openai.AuthenticationError):
            oai.completions.create(model="gpt2", prompt="Hello", max_tokens=3)
        with pytest.raises(openai.AuthenticationError):
            oai.models.list()


def test_unsigned_requests_get_401_and_wrong_keys_403(secured: ThreadServer) -> None:
    with httpx.Client(base_url=secured.url, timeout=60) as c:
        for method, path in (
            ("POST", "/invocations"),
            ("POST", "/v1/completions"),
            ("GET", "/metrics"),
            ("GET", "/docs"),
            ("GET", "/openapi.json"),
            ("GET", "/execution-parameters"),
        ):
            answer = c.request(method, path, json=BODY)
            assert answer.status_code == 401, path
            assert (
                answer.json()["error"]["type"] == "authentication_error"
                and "www-authenticate" in answer.headers
            )
        wrong = c.post("/invocations", json=BODY, headers={"x-api-key": "not-a-key"})
        assert (
            wrong.status_code == 403
            and wrong.json()["error"]["message"] == "the request's credential was not accepted"
        )
        # The runtime path answers as AWS does: 403 MissingAuthenticationTokenException.
        runtime = c.post(RUNTIME, json=BODY)
        assert (
            runtime.status_code == 403
            and runtime.headers["x-amzn-errortype"] == "MissingAuthenticationTokenException"
        )
        assert runtime.json()["message"] == "Missing Authentication Token"
        for header in ({"x-api-key": BOB}, {"authorization": f"Bearer {BOB}"}):
            assert c.post("/invocations", json=BODY, headers=header).status_code == 200
        assert c.get("/metrics", headers={"x-api-key": BOB}).status_code == 200


def test_ping_and_the_playground_paths_stay_open(secured: ThreadServer) -> None:
    assert httpx.get(f"{secured.url}/ping").status_code == 200
    for path in ("/", "/static/app.js"):  # not refused (404 until the playground is installed)
        assert httpx.get(f"{secured.url}{path}").status_code in (200, 404)


def test_a_key_over_its_requests_per_minute_gets_429_and_another_key_does_not(secured: ThreadServer) -> None:
    with httpx.Client(base_url=secured.url, timeout=60) as c:
        carol, bob = {"x-api-key": CAROL}, {"x-api-key": BOB}
        assert [c.get("/v1/models", headers=carol).status_code for _ in range(2)] == [200, 200]
        over = c.get("/v1/models", headers=carol)
        assert over.status_code == 429 and 1 <= int(over.headers["retry-after"]) <= 60
        error = over.json()["error"]
        assert error["type"] == "rate_limit_error" and error["param"] == "requests_per_minute"
        assert "'carol'" in error["message"] and "2 requests per minute" in error["message"]
        assert all(c.get("/v1/models", headers=bob).status_code == 200 for _ in range(3))
        runtime = c.post(RUNTIME, json=BODY, headers=carol)  # as AWS throttles
        assert runtime.status_code == 429 and runtime.headers["x-amzn-errortype"] == "ThrottlingException"
        metrics = c.get("/metrics", headers=bob).text
    assert 'gpt2serve_key_rejected_requests_total{key="carol",quota="requests_per_minute"} 2.0' in metrics
    assert 'gpt2serve_key_requests_last_minute{key="carol"} 2.0' in metrics
    assert 'gpt2serve_auth_refused_total{reason="missing"}' in metrics
    assert CAROL not in metrics and BOB not in metrics and SECRET not in metrics


def test_generated_tokens_are_metered_per_key(secured: ThreadServer) -> None:
    with httpx.Client(base_url=secured.url, timeout=60) as c:
        dave = {"x-api-key": DAVE}
        request = {"model": "gpt2", "prompt": "Hi", "max_tokens": 6, "temperature": 0}
        first = c.post("/v1/completions", json=request, headers=dave)
        assert first.status_code == 200
        made = first.json()["usage"]["completion_tokens"]
        over = c.post("/v1/completions", json=request, headers=dave)
        metrics = c.get("/metrics", headers={"x-api-key": BOB}).text
    assert f'gpt2serve_key_generated_tokens_total{{key="dave"}} {float(made)}' in metrics
    assert made >= 3  # past its 3 tokens per minute
    assert over.status_code == 429 and over.json()["error"]["param"] == "tokens_per_minute"


def test_keys_are_never_logged(secured: ThreadServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        httpx.post(f"{secured.url}/invocations", json=BODY, headers={"x-api-key": ALICE + "x"})
        httpx.post(f"{secured.url}/invocations", json=BODY, headers={"x-api-key": ALICE})
        signed_with_requests(secured.url, "/invocations", secret="wrong")
    logged = caplog.text
    assert "refused POST /invocations" in logged
    assert ALICE not in logged and SECRET not in logged


def test_cors_only_for_the_listed_origins(secured: ThreadServer, client: httpx.Client) -> None:
    preflight = {"origin": ORIGIN, "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization,content-type"}  # fmt: skip
    answer = httpx.options(f"{secured.url}/v1/completions", headers=preflight)
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == ORIGIN
    refused = httpx.post(f"{secured.url}/v1/completions", json={}, headers={"origin": ORIGIN})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(
        f"{secured.url}/v1/completions", headers={**preflight, "origin": "http://evil.example"}
    )
    assert "access-control-allow-origin" not in other.headers
    # The common test server has no --cors-origins: no CORS headers at all.
    assert "access-control-allow-origin" not in client.get("/ping", headers={"origin": ORIGIN}).headers


# -- configuration: files, flags, variables, defaults (no server) --


def test_keys_file_names_quotas_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{ALICE}\n\n  # comment\n{BOB} bob concurrent_requests=2 tokens_per_minute=50 # x\n")
    unnamed, bob = parse_keys_file(str(path), Quota(requests_per_minute=7))
    assert unnamed.name == short_hash(ALICE) and unnamed.quota == Quota(None, 7, None)
    assert bob.name == "bob" and bob.quota == Quota(2, 7, 50) and bob.digest == key_digest(BOB)
    for line, message in ((f"{ALICE} a rpm=3", ":1: unknown option 'rpm'"),
                          (f"{ALICE} a requests_per_minute=0", "requests_per_minute must be an integer > 0"),
                          ("k\u00e9y-0123456789abcdef", "printable ASCII")):  # fmt: skip
        path.write_text(line)
        with pytest.raises(AuthConfigError, match=message):
            parse_keys_file(str(path), Quota())


def test_credentials_file_sections(tmp_path: Path) -> None:
    path = tmp_path / "credentials"
    path.write_text(f"[ci]\naws_access_key_id = {AKID}\naws_secret_access_key = {SECRET}\nregion = x\n"
                    "[temp]\naws_access_key_id=ASIA1\naws_secret_access_key=s\naws_session_token=t\n"
                    "requests_per_minute = 4\n")  # fmt: skip
    credentials, quotas = parse_credentials_file(str(path), Quota())
    assert credentials[AKID].name == "ci" and credentials["ASIA1"].session_token == "t"
    assert quotas["ASIA1"].requests_per_minute == 4 and quotas[AKID] == Quota()
    path.write_text("[ci]\naws_access_key_id = A\n")
    with pytest.raises(AuthConfigError, match=r"\[ci\]: needs aws_access_key_id and aws_secret_access_key"):
        parse_credentials_file(str(path), Quota())


def test_api_key_flag_repeats_and_the_variable_takes_a_list(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--api-key", ALICE, "--api-key", BOB, "--key-requests-per-minute", "9"])
    settings = Settings.from_args(args, {"GPT2SERVE_API_KEYS": "ignored-when-the-flag-is-given"})
    assert settings.api_keys == (ALICE, BOB) and settings.key_requests_per_minute == 9
    from_env = Settings.from_env({"GPT2SERVE_API_KEYS": f"{ALICE}, {BOB}", "GPT2SERVE_CORS_ORIGINS": "*"})
    assert from_env.api_keys == (ALICE, BOB) and from_env.cors_origins == ("*",)
    config = load_auth_config(from_env)
    assert [k.name for k in config.api_keys] == [short_hash(ALICE), short_hash(BOB)]
    with pytest.raises(SystemExit):
        parser.parse_args(["--api-keys-file", str(tmp_path / "missing")])
    path = tmp_path / "keys"
    path.write_text(f"{ALICE} same\n{BOB} same\n")
    with pytest.raises(AuthConfigError, match="unique"):
        load_auth_config(Settings(api_keys_file=str(path)))


def test_serve_binds_loopback_and_the_container_all_interfaces() -> None:
    assert Settings.from_env({}).host == "127.0.0.1"
    assert container_settings([], {}).host == "0.0.0.0"
    assert container_settings(["--host", "10.0.0.1"], {}).host == "10.0.0.1"
    assert container_settings([], {"GPT2SERVE_HOST": "127.0.0.1"}).host == "127.0.0.1"


def test_warning_when_open_beyond_loopback(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gpt2serve.api.auth"):
        create_app(Settings(model="random:gpt2", host="0.0.0.0"))
        create_app(Settings(model="random:gpt2", host="127.0.0.1"))
        create_app(Settings(model="random:gpt2", host="0.0.0.0", api_keys=(ALICE,)))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "listening on 0.0.0.0 with no API keys" in warnings[0]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl to make a certificate")
def test_tls_under_uvicorn_with_the_asgi_factory(tiny_checkpoint: Path, tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days",
         "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(SRC), "GPT2SERVE_MODEL": str(tiny_checkpoint),
           "GPT2SERVE_DEVICE": "cpu", "GPT2SERVE_API_KEYS": ALICE, "GPT2SERVE_THREADS": "1"}  # fmt: skip
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "gpt2serve.api.asgi:create",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--ssl-keyfile",
        str(key),
        "--ssl-certfile",
        str(cert),
    ]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, trust = f"https://127.0.0.1:{port}", ssl.create_default_context(cafile=str(cert))
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/ping", verify=trust, timeout=2).status_code == 200
            except httpx.TransportError:
                return proc.poll() is not None  # stop waiting if it died

        wait_for(ready, what="TLS server ready")
        assert proc.poll() is None
        body = {"model": "gpt2", "prompt": "Hi", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body, verify=trust).status_code == 401
        http_client = httpx.Client(verify=trust)
        with openai.OpenAI(
            base_url=f"{url}/v1", api_key=ALICE, http_client=http_client, max_retries=0
        ) as oai:
            assert oai.completions.create(**body).choices[0].text is not None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
