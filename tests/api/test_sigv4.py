"""The SigV4 verifier against botocore's signer (botocore.auth.SigV4Auth): the requests of AWS's published
Signature Version 4 test suite (aws-sig-v4-test-suite: its credentials, date, region and service), signed
by botocore, verify; a change to any signed part, a stale date, another service or region, a wrong
secret or session token do not."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from unittest import mock
from urllib.parse import urlsplit

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from gpt2serve.api import sigv4
from gpt2serve.api.sigv4 import Credential, Failure, SignedRequest, SigV4Error, verify

# The test suite's fixed inputs.
AKID, SECRET = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
SUITE_TIME = datetime(2015, 8, 30, 12, 36, 0, tzinfo=timezone.utc)
REGION, SERVICE = "us-east-1", "service"
HOST = "example.amazonaws.com"
# The suite's published signature of `get-vanilla` (GET / with host and x-amz-date signed).
GET_VANILLA_SIGNATURE = "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
CREDENTIALS = {AKID: Credential("suite", AKID, SECRET)}

# name -> (method, path and query as sent on the wire, extra headers, body); the suite's requests
# (get-header-value-multiline left out: an obs-folded header cannot be sent by HTTP clients today).
VECTORS = {
    "get-vanilla": ("GET", "/", [], b""),
    "get-vanilla-empty-query-key": ("GET", "/?Param1=value1", [], b""),
    "get-vanilla-query": ("GET", "/", [], b""),
    "get-vanilla-query-order-key": ("GET", "/?Param2=value2&Param1=value1", [], b""),
    "get-vanilla-query-order-key-case": ("GET", "/?Param2=value2&Param1=value1", [], b""),
    "get-vanilla-query-order-value": ("GET", "/?Param1=value2&Param1=Value1", [], b""),
    "get-vanilla-query-unreserved": (
        "GET", "/?-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz="
        "-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", [], b""),
    "get-vanilla-utf8-query": ("GET", "/?%E1%88%B4=bar", [], b""),
    "get-utf8": ("GET", "/%E1%88%B4", [], b""),
    "get-space": ("GET", "/example%20space/", [], b""),
    "get-slash": ("GET", "//example/", [], b""),
    "get-slashes": ("GET", "//example//", [], b""),
    "get-slash-dot-slash": ("GET", "/./", [], b""),
    "get-slash-pointless-dot": ("GET", "/./example", [], b""),
    "get-relative": ("GET", "/example/..", [], b""),
    "get-relative-relative": ("GET", "/example1/example2/../..", [], b""),
    "get-header-key-duplicate": ("GET", "/", [("My-Header1", "value2"), ("My-Header1", "value2"),
                                              ("My-Header1", "value1")], b""),
    "get-header-value-order": ("GET", "/", [("My-Header1", "value4"), ("My-Header1", "value1"),
                                            ("My-Header1", "value3"), ("My-Header1", "value2")], b""),
    "get-header-value-trim": ("GET", "/", [("My-Header1", " value1"), ("My-Header2", ' "a   b   c"')], b""),
    "post-header-key-case": ("POST", "/", [], b""),
    "post-header-key-sort": ("POST", "/", [("My-Header1", "value1")], b""),
    "post-header-value-case": ("POST", "/", [("My-Header1", "VALUE1")], b""),
    "post-vanilla": ("POST", "/", [], b""),
    "post-vanilla-empty-query-value": ("POST", "/?Param1=value1", [], b""),
    "post-vanilla-query": ("POST", "/?Param1=value1", [], b""),
    "post-x-www-form-urlencoded": (
        "POST", "/", [("Content-Type", "application/x-www-form-urlencoded")], b"Param1=value1"),
    "post-x-www-form-urlencoded-parameters": (
        "POST", "/", [("Content-Type", "application/x-www-form-urlencoded; charset=utf8")], b"Param1=value1"),
}  # fmt: skip


def botocore_signed(
    method: str,
    target: str,
    headers: list,
    body: bytes,
    *,
    at: datetime = SUITE_TIME,
    service: str = SERVICE,
    region: str = REGION,
    secret: str = SECRET,
    token: str | None = None,
) -> AWSRequest:
    """The request as botocore signs it at time `at` (botocore reads the time from get_current_datetime)."""
    request = AWSRequest(method=method, url=f"https://{HOST}{target}", data=body)
    for name, value in headers:  # repeated names are kept, in order
        request.headers.add_header(name, value)
    naive = at.astimezone(timezone.utc).replace(tzinfo=None)
    with mock.patch("botocore.auth.get_current_datetime", return_value=naive):
        SigV4Auth(Credentials(AKID, secret, token), service, region).add_auth(request)
    return request


def as_received(request: AWSRequest, body: bytes | None = None) -> SignedRequest:
    """What a server receives for `request` (the client adds Host)."""
    parts = urlsplit(request.url)
    headers = [(k, v) for k, v in request.headers.items()]
    if "host" not in {k.lower() for k, _ in headers}:
        headers.append(("Host", parts.netloc))
    sent = request.body if body is None else body
    return SignedRequest(request.method, parts.path, parts.query, tuple(headers), sent or b"")


def signature_of(request: AWSRequest) -> str:
    return request.headers["Authorization"].rsplit("Signature=", 1)[1]


def test_botocore_reproduces_the_published_get_vanilla_signature() -> None:
    assert signature_of(botocore_signed("GET", "/", [], b"")) == GET_VANILLA_SIGNATURE


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_suite_request_signed_by_botocore_verifies(name: str) -> None:
    method, target, headers, body = VECTORS[name]
    request = botocore_signed(method, target, headers, body)
    assert verify(as_received(request), CREDENTIALS, SUITE_TIME, REGION, SERVICE).name == "suite"


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_suite_request_with_a_changed_part_is_refused(name: str) -> None:
    method, target, headers, body = VECTORS[name]
    received = as_received(botocore_signed(method, target, headers, body))
    changed = {
        "method": SignedRequest("PUT", *_fields(received)[1:]),
        "path": SignedRequest(received.method, received.raw_path + "x", *_fields(received)[2:]),
        "query": SignedRequest(received.method, received.raw_path, received.query_string + "&z=1",
                               received.headers, received.body),
        "host": SignedRequest(*_fields(received)[:3], _replace_header(received.headers, "host", "evil.com"),
                              received.body),
        "body": SignedRequest(*_fields(received)[:4], received.body + b"!"),
    }  # fmt: skip
    for part, request in changed.items():
        with pytest.raises(SigV4Error) as info:
            verify(request, CREDENTIALS, SUITE_TIME, REGION, SERVICE)
        assert info.value.kind is Failure.BAD_SIGNATURE, part


def _fields(r: SignedRequest) -> tuple:
    return (r.method, r.raw_path, r.query_string, r.headers, r.body)


def _replace_header(headers: tuple, name: str, value: str) -> tuple:
    return tuple((k, value if k.lower() == name else v) for k, v in headers)


def test_the_date_must_be_within_five_minutes() -> None:
    received = as_received(botocore_signed("GET", "/", [], b""))
    for skew in (timedelta(minutes=4, seconds=59), -timedelta(minutes=4, seconds=59)):
        verify(received, CREDENTIALS, SUITE_TIME + skew, REGION, SERVICE)
    for skew in (timedelta(minutes=5, seconds=1), timedelta(minutes=20), -timedelta(minutes=6)):
        with pytest.raises(SigV4Error, match="expired") as info:
            verify(received, CREDENTIALS, SUITE_TIME + skew, REGION, SERVICE)
        assert info.value.kind is Failure.BAD_SIGNATURE


def test_service_region_secret_and_key_id() -> None:
    def refused(request: AWSRequest, region: str | None = None) -> Failure:
        with pytest.raises(SigV4Error) as info:
            verify(as_received(request), CREDENTIALS, SUITE_TIME, region, SERVICE)
        return info.value.kind

    assert refused(botocore_signed("GET", "/", [], b"", service="execute-api")) is Failure.BAD_SIGNATURE
    eu = botocore_signed("GET", "/", [], b"", region="eu-west-1")
    assert verify(as_received(eu), CREDENTIALS, SUITE_TIME, None, SERVICE)  # any region by default
    assert refused(eu, region=REGION) is Failure.BAD_SIGNATURE
    assert refused(botocore_signed("GET", "/", [], b"", secret="not-the-secret")) is Failure.BAD_SIGNATURE
    other = {"AKIDOTHER": Credential("other", "AKIDOTHER", SECRET)}
    with pytest.raises(SigV4Error) as info:
        verify(as_received(botocore_signed("GET", "/", [], b"")), other, SUITE_TIME, None, SERVICE)
    assert info.value.kind is Failure.UNKNOWN_KEY


def test_session_token_is_checked() -> None:
    token = "AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPBSM22wDOk4x4HIZ8j4FZTwdQWLWsKWHGBuFqwAeMicRXmxfpSPfIeoIYRqTflfKD8YUuwthAx7mSEI/qkPpKPi/kMcGdQrmGdeehM4IC1NtBmUpp2wUE8phUZampKsburEDy0KPkyQDYwT7WZ0wq5VSXDvp75YU9HFvlRd8Tx6q6fE8YQcHNVXAkiY9q6d+xo0rKwT38xVqr7ZD0u0iPPkUL64lIZbqBAz+scqKmlzm8FDrypNC9Yjc8fPOLn9FX9KSYvKTr4rvx3iSIlTJabIQwj2ICCR/oLxBA=="  # noqa: E501 (the suite's)
    with_token = {AKID: Credential("suite", AKID, SECRET, token)}
    request = as_received(botocore_signed("POST", "/", [], b"", token=token))
    assert verify(request, with_token, SUITE_TIME, REGION, SERVICE).name == "suite"
    for credentials in ({AKID: Credential("suite", AKID, SECRET, "another")}, CREDENTIALS):
        with pytest.raises(SigV4Error) as info:
            verify(request, credentials, SUITE_TIME, REGION, SERVICE)
        assert info.value.kind is Failure.UNKNOWN_KEY


def test_a_payload_hash_header_must_be_the_bodys() -> None:
    headers = [("X-Amz-Content-SHA256", sigv4.hashlib.sha256(b"signed").hexdigest())]
    signed = botocore_signed("POST", "/", headers, b"signed")
    assert verify(as_received(signed), CREDENTIALS, SUITE_TIME, REGION, SERVICE)
    with pytest.raises(SigV4Error, match="SHA-256"):
        verify(as_received(signed, body=b"changed"), CREDENTIALS, SUITE_TIME, REGION, SERVICE)
    unsigned = botocore_signed("POST", "/", [("X-Amz-Content-SHA256", "UNSIGNED-PAYLOAD")], b"x")
    with pytest.raises(SigV4Error):
        verify(as_received(unsigned), CREDENTIALS, SUITE_TIME, REGION, SERVICE)


@pytest.mark.parametrize(
    "authorization",
    [
        "",
        "AWS4-HMAC-SHA1 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        "SignedHeaders=host;x-amz-date, Signature=00",
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service, SignedHeaders=host, Signature=0",
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, Signature=0",
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        "SignedHeaders=x-amz-date;host, Signature=0",
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        "SignedHeaders=x-amz-date, Signature=0",
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        "SignedHeaders=host;x-amz-date, Signature=\u00e9\u00e9",  # not hex, not even ASCII
    ],
)
def test_malformed_authorization_headers_are_refused(authorization: str) -> None:
    headers = (("Host", HOST), ("X-Amz-Date", "20150830T123600Z"), ("Authorization", authorization))
    with pytest.raises(SigV4Error) as info:
        verify(SignedRequest("GET", "/", "", headers, b""), CREDENTIALS, SUITE_TIME, REGION, SERVICE)
    assert info.value.kind is Failure.BAD_SIGNATURE
