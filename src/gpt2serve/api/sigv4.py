"""AWS Signature Version 4 verification: the server's half of what botocore's SigV4Auth signs.

`verify(request, credentials, now)` rebuilds the canonical request from what arrived on the wire (method,
the raw path, the query string, the signed headers, the body's SHA-256), derives the signing key of the
access key id named in the `Authorization` header's credential scope, and compares signatures with
`hmac.compare_digest`. It checks, as AWS does:

- the `Authorization: AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...` header's form;
- the scope `<yyyymmdd>/<region>/<service>/aws4_request`: service `sagemaker`, the region if one is
  required, the date equal to `X-Amz-Date`'s;
- `X-Amz-Date` within 5 minutes of the server's clock;
- `host` among the signed headers; an `X-Amz-Content-SHA256` header, if sent, equal to the body's hash
  (so a body changed after signing is refused even when the hash travels in a header);
- a session token (`X-Amz-Security-Token`) equal to the one configured for the key, where one is.

Only header-signed requests are accepted (no presigned query strings, no unsigned or chunk-signed
payloads). Failures raise `SigV4Error` whose `kind` says which AWS error code answers it; its message
is for the server log, never for the caller.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from urllib.parse import quote, unquote

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "sagemaker"
MAX_SKEW = timedelta(minutes=5)
AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
_AUTH_FIELDS = re.compile(r"\s*(Credential|SignedHeaders|Signature)\s*=\s*([^,\s]*)\s*")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class Failure(enum.Enum):
    """What went wrong, by the AWS error code that answers it."""

    UNKNOWN_KEY = "UnrecognizedClientException"  # no such access key id, or a wrong session token
    BAD_SIGNATURE = "InvalidSignatureException"  # malformed, mis-scoped, stale or not matching


class SigV4Error(Exception):
    def __init__(self, kind: Failure, reason: str):
        super().__init__(reason)
        self.kind = kind


@dataclass(frozen=True)
class Credential:
    """One key pair that may call (a section of an AWS shared-credentials file)."""

    name: str
    access_key_id: str
    secret_access_key: str
    session_token: str | None = None


@dataclass(frozen=True)
class SignedRequest:
    """What the verifier needs of a request, as it arrived: `raw_path` still percent-encoded, header
    names in any case (repeated names allowed), `body` the bytes after transfer decoding."""

    method: str
    raw_path: str
    query_string: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header_values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name]

    def header(self, name: str) -> str | None:
        values = self.header_values(name)
        return values[0] if values else None


@dataclass(frozen=True)
class AuthorizationHeader:
    access_key_id: str
    date: str
    region: str
    service: str
    terminal: str
    signed_headers: tuple[str, ...]
    signature: str

    @property
    def scope(self) -> str:
        return f"{self.date}/{self.region}/{self.service}/{self.terminal}"


def is_sigv4(authorization: str | None) -> bool:
    return bool(authorization) and authorization.split(" ", 1)[0] == ALGORITHM


def parse_authorization(value: str) -> AuthorizationHeader:
    algorithm, _, rest = value.partition(" ")
    if algorithm != ALGORITHM:
        raise SigV4Error(Failure.BAD_SIGNATURE, f"algorithm {algorithm!r} is not {ALGORITHM}")
    fields: dict[str, str] = {}
    for part in rest.split(","):
        match = _AUTH_FIELDS.fullmatch(part)
        if match is None or match.group(1) in fields:
            raise SigV4Error(Failure.BAD_SIGNATURE, "malformed Authorization header")
        fields[match.group(1)] = match.group(2)
    if set(fields) != {"Credential", "SignedHeaders", "Signature"}:
        raise SigV4Error(Failure.BAD_SIGNATURE, "Authorization lacks Credential, SignedHeaders or Signature")
    scope = fields["Credential"].split("/")
    if len(scope) != 5 or not all(scope):
        raise SigV4Error(Failure.BAD_SIGNATURE, "malformed credential scope")
    signed = tuple(fields["SignedHeaders"].split(";"))
    if list(signed) != sorted(set(signed)) or any(h != h.lower() or not h for h in signed):
        raise SigV4Error(Failure.BAD_SIGNATURE, "SignedHeaders are not sorted lower-case names")
    return AuthorizationHeader(*scope, signed_headers=signed, signature=fields["Signature"])


def canonical_path(raw_path: str) -> str:
    """The wire path without dot segments or empty segments, URI-encoded once more (every service but
    S3 signs the path encoded twice), as botocore's SigV4Auth computes it."""
    segments: list[str] = []
    for part in raw_path.split("/"):
        if part == "..":
            if segments:
                segments.pop()
        elif part and part != ".":
            segments.append(part)
    path = "/" + "/".join(segments)
    if raw_path.endswith("/") and segments:
        path += "/"
    return quote(path, safe="/~")


def canonical_query(query_string: str) -> str:
    """Each name and value decoded, re-encoded as RFC 3986 unreserved-safe, sorted by name then value."""
    if not query_string:
        return ""
    pairs = []
    for pair in query_string.split("&"):
        key, _, value = pair.partition("=")
        pairs.append((quote(unquote(key), safe="-_.~"), quote(unquote(value), safe="-_.~")))
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def canonical_headers(request: SignedRequest, names: Iterable[str]) -> str:
    lines = []
    for name in names:
        values = request.header_values(name)
        if not values:
            raise SigV4Error(Failure.BAD_SIGNATURE, f"signed header {name!r} is absent")
        lines.append(f"{name}:{','.join(' '.join(v.split()) for v in values)}\n")
    return "".join(lines)


def payload_hash(request: SignedRequest) -> str:
    """The body's SHA-256; an `X-Amz-Content-SHA256` header must be that same hash."""
    actual = hashlib.sha256(request.body).hexdigest()
    declared = request.header("x-amz-content-sha256")
    if declared is not None and not (_HEX64.match(declared) and hmac.compare_digest(declared, actual)):
        raise SigV4Error(Failure.BAD_SIGNATURE, "X-Amz-Content-SHA256 is not the body's SHA-256")
    return actual


def canonical_request(request: SignedRequest, signed_headers: tuple[str, ...]) -> str:
    return "\n".join((
        request.method.upper(),
        canonical_path(request.raw_path),
        canonical_query(request.query_string),
        canonical_headers(request, signed_headers),
        ";".join(signed_headers),
        payload_hash(request),
    ))  # fmt: skip


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = f"AWS4{secret}".encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def _request_time(request: SignedRequest, auth: AuthorizationHeader, now: datetime) -> str:
    amz_date = request.header("x-amz-date")
    if amz_date is None:
        raise SigV4Error(Failure.BAD_SIGNATURE, "no X-Amz-Date header")
    try:
        signed_at = datetime.strptime(amz_date, AMZ_DATE_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError:
        raise SigV4Error(Failure.BAD_SIGNATURE, f"X-Amz-Date {amz_date!r} is malformed") from None
    if abs(now - signed_at) > MAX_SKEW:
        raise SigV4Error(Failure.BAD_SIGNATURE, f"signature expired: signed at {amz_date}")
    if auth.date != amz_date[:8]:
        raise SigV4Error(Failure.BAD_SIGNATURE, "the credential scope's date is not X-Amz-Date's")
    return amz_date


def _check_scope(auth: AuthorizationHeader, region: str | None, service: str) -> None:
    if auth.service != service:
        raise SigV4Error(Failure.BAD_SIGNATURE, f"scoped to service {auth.service!r}, not {service!r}")
    if region is not None and auth.region != region:
        raise SigV4Error(Failure.BAD_SIGNATURE, f"scoped to region {auth.region!r}, not {region!r}")
    if auth.terminal != "aws4_request":
        raise SigV4Error(Failure.BAD_SIGNATURE, "the credential scope does not end in aws4_request")
    if "host" not in auth.signed_headers:
        raise SigV4Error(Failure.BAD_SIGNATURE, "the host header is not signed")


def verify(
    request: SignedRequest,
    credentials: Mapping[str, Credential],
    now: datetime | None = None,
    region: str | None = None,
    service: str = SERVICE,
) -> Credential:
    """The credential whose signature `request` carries; raises SigV4Error otherwise. `credentials` maps
    access key ids to key pairs; `region` None accepts any region."""
    now = now or datetime.now(timezone.utc)
    auth = parse_authorization(request.header("authorization") or "")
    credential = credentials.get(auth.access_key_id)
    if credential is None:
        raise SigV4Error(Failure.UNKNOWN_KEY, f"unknown access key id {auth.access_key_id!r}")
    _check_scope(auth, region, service)
    amz_date = _request_time(request, auth, now)
    canonical = canonical_request(request, auth.signed_headers)
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    string_to_sign = f"{ALGORITHM}\n{amz_date}\n{auth.scope}\n{digest}"
    key = signing_key(credential.secret_access_key, auth.date, auth.region, auth.service)
    expected = hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), auth.signature.encode("utf-8", "surrogateescape")):
        raise SigV4Error(Failure.BAD_SIGNATURE, "the signature does not match")
    _check_session_token(request, credential)
    return credential


def _check_session_token(request: SignedRequest, credential: Credential) -> None:
    given = request.header("x-amz-security-token")
    wanted = credential.session_token
    if given is None and wanted is None:
        return
    if given is None or wanted is None or not hmac.compare_digest(given.encode(), wanted.encode()):
        raise SigV4Error(Failure.UNKNOWN_KEY, "the session token is not this key's")
