"""Who may call: API keys, AWS SigV4 signatures, and each key's quotas (see `gpt2serve.api.quotas`).

Auth is on when any API key (`--api-key`, `--api-keys-file`, `GPT2SERVE_API_KEYS`) or SigV4 credentials
file (`--sigv4-credentials`) is configured; then every route but `/ping`, the playground page (`/`) and
its `/static/` files needs a credential. `/metrics`, `/docs` and `/openapi.json` follow the setting.

- API keys arrive as `Authorization: Bearer KEY` (the OpenAI client) or `x-api-key: KEY`. The key is
  compared with `hmac.compare_digest` against every configured key's SHA-256 (constant time, and the
  length is not leaked either). Keys are never logged: their name is, or `key-<first 8 hex of sha256>`.
- `Authorization: AWS4-HMAC-SHA256 ...` is verified by `gpt2serve.api.sigv4` over the raw body, read here
  and handed on unchanged to the route.

Refusals take the dialect of the path: at the SageMaker runtime paths (`/endpoints/<name>/invocations`
and `-response-stream`) as the AWS runtime answers, 403 with `x-amzn-ErrorType` (boto3 raises
ClientError with that code) and 429 ThrottlingException; under `/v1/` as OpenAI answers, 401 for a
missing or wrong key (the client raises AuthenticationError); elsewhere 401 without a credential and 403
with a wrong one. Messages never say which part of a credential was wrong; the server log does.
"""

from __future__ import annotations

import configparser
import hashlib
import hmac
import ipaddress
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI
from prometheus_client import Counter
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpt2serve.api import sigv4
from gpt2serve.api.errors import envelope
from gpt2serve.api.quotas import KeyUsage, Quota, QuotaExceededError, UsageCollector
from gpt2serve.engine.usage import current_meter
from gpt2serve.settings import Settings

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/ping", "/", "/favicon.ico"})
OPEN_PREFIXES = ("/static/",)
RUNTIME_PATH = re.compile(r"^/endpoints/[^/]+/invocations(-response-stream)?$")
AWS_MESSAGES = {  # what the AWS runtime says for each code
    "MissingAuthenticationTokenException": "Missing Authentication Token",
    "UnrecognizedClientException": "The security token included in the request is invalid.",
    "InvalidSignatureException": "The request signature we calculated does not match the signature you "
    "provided. Check your AWS Secret Access Key and signing method. Consult the service documentation "
    "for details.",
}
_KEY_CHARS = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces: what a header can carry


class AuthConfigError(ValueError):
    """A keys or credentials file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes  # SHA-256 of the key: the key itself is not kept
    quota: Quota = field(default_factory=Quota)


@dataclass
class AuthConfig:
    api_keys: list[ApiKey] = field(default_factory=list)
    sigv4: dict[str, sigv4.Credential] = field(default_factory=dict)  # by access key id
    sigv4_quotas: dict[str, Quota] = field(default_factory=dict)  # by access key id
    region: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys or self.sigv4)

    def quotas(self) -> dict[str, Quota]:
        """Each key's name -> its quota."""
        named = {k.name: k.quota for k in self.api_keys}
        named.update({c.name: self.sigv4_quotas[akid] for akid, c in self.sigv4.items()})
        return named


def key_digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def short_hash(key: str | bytes) -> str:
    return "key-" + key_digest(key).hex()[:8]


def _quota_options(options: Iterable[str], where: str) -> Quota:
    values: dict[str, int] = {}
    for option in options:
        name, _, raw = option.partition("=")
        if name not in Quota.names():
            raise AuthConfigError(f"{where}: unknown option {name!r} (known: {', '.join(Quota.names())})")
        if not raw.isdigit() or int(raw) <= 0:
            raise AuthConfigError(f"{where}: {name} must be an integer > 0, got {raw!r}")
        values[name] = int(raw)
    return Quota(**values)


def _api_key(secret: str, name: str | None, quota: Quota, where: str) -> ApiKey:
    if not _KEY_CHARS.match(secret):
        raise AuthConfigError(f"{where}: an API key must be printable ASCII without spaces")
    if len(secret) < 16:
        logger.warning("%s: API key %s is shorter than 16 characters", where, name or short_hash(secret))
    return ApiKey(name or short_hash(secret), key_digest(secret), quota)


def parse_keys_file(path: str, defaults: Quota) -> list[ApiKey]:
    """`KEY [NAME] [option=N ...]` a line; blank lines and `#` comments skipped."""
    keys = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        where = f"{path}:{number}"
        name = words[1] if len(words) > 1 and "=" not in words[1] else None
        options = words[2:] if name else words[1:]
        keys.append(_api_key(words[0], name, _quota_options(options, where).merged(defaults), where))
    return keys


def parse_credentials_file(
    path: str, defaults: Quota
) -> tuple[dict[str, sigv4.Credential], dict[str, Quota]]:
    """The ~/.aws/credentials format: a section per key pair (its name is the key's name), with
    `aws_access_key_id`, `aws_secret_access_key`, optionally `aws_session_token` and quota options."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(Path(path).read_text(), source=path)
    except configparser.Error as exc:
        raise AuthConfigError(f"{path}: {exc}") from None
    credentials, quotas = {}, {}
    for section in parser.sections():
        values = dict(parser[section])
        akid, secret = values.pop("aws_access_key_id", None), values.pop("aws_secret_access_key", None)
        if not akid or not secret:
            raise AuthConfigError(f"{path} [{section}]: needs aws_access_key_id and aws_secret_access_key")
        token = values.pop("aws_session_token", None) or None
        for ignored in ("region", "output"):
            values.pop(ignored, None)
        quota = _quota_options((f"{k}={v}" for k, v in values.items()), f"{path} [{section}]")
        credentials[akid] = sigv4.Credential(section, akid, secret, token)
        quotas[akid] = quota.merged(defaults)
    if not credentials:
        raise AuthConfigError(f"{path}: no [section] with aws_access_key_id and aws_secret_access_key")
    return credentials, quotas


def load_auth_config(settings: Settings) -> AuthConfig:
    defaults = Quota(
        settings.key_concurrent_requests, settings.key_requests_per_minute, settings.key_tokens_per_minute
    )
    config = AuthConfig(region=settings.sigv4_region)
    for i, secret in enumerate(settings.api_keys, 1):
        config.api_keys.append(
            _api_key(secret, None, defaults, f"API key #{i} of --api-key/GPT2SERVE_API_KEYS")
        )
    if settings.api_keys_file:
        config.api_keys += parse_keys_file(settings.api_keys_file, defaults)
    if settings.sigv4_credentials:
        config.sigv4, config.sigv4_quotas = parse_credentials_file(settings.sigv4_credentials, defaults)
    names = [k.name for k in config.api_keys] + [c.name for c in config.sigv4.values()]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise AuthConfigError(f"key names must be unique (they label quotas and metrics): {repeated}")
    return config


class Refusal(Exception):
    """A credential was missing (`missing`) or not accepted; `aws_code` is the AWS runtime's code."""

    def __init__(self, missing: bool, aws_code: str, reason: str):
        super().__init__(reason)
        self.missing, self.aws_code = missing, aws_code


def _headers(scope: Scope) -> tuple[tuple[str, str], ...]:
    return tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope.get("headers", ()))


def _given_api_key(headers: tuple[tuple[str, str], ...]) -> str | None:
    for name, value in headers:
        if name == "authorization" and value[:7].lower() == "bearer ":
            return value[7:].strip()
        if name == "x-api-key":
            return value.strip()
    return None


class AuthMiddleware:
    """Authenticates every request to a protected path, applies its key's quotas, meters its tokens."""

    def __init__(self, app: ASGIApp, config: AuthConfig, usages: dict[str, KeyUsage], refused: Counter):
        self.app, self.config, self.usages, self.refused = app, config, usages, refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        try:
            name, receive = await self._authenticate(scope, receive)
        except Refusal as refusal:
            self.refused.labels("missing" if refusal.missing else "invalid").inc()
            logger.info("refused %s %s: %s", scope.get("method"), path, refusal)
            await _refusal_response(path, refusal, _request_id(scope))(scope, receive, send)
            return
        usage = self.usages[name]
        try:
            usage.admit()
        except QuotaExceededError as exc:
            logger.info("key %s over its quota: %s", name, exc.param)
            await _quota_response(path, exc, _request_id(scope))(scope, receive, send)
            return
        scope.setdefault("state", {})["key_name"] = name
        token = current_meter.set(usage.charge)
        try:
            await self.app(scope, receive, send)
        finally:
            current_meter.reset(token)
            usage.release()

    async def _authenticate(self, scope: Scope, receive: Receive) -> tuple[str, Receive]:
        """The caller's key name, and `receive` (replaying the body if it was read to verify it)."""
        headers = _headers(scope)
        authorization = next((v for k, v in headers if k == "authorization"), None)
        if sigv4.is_sigv4(authorization):
            if not self.config.sigv4:
                raise Refusal(False, "UnrecognizedClientException", "SigV4 signature, no credentials file")
            body, receive = await _read_body(receive)
            request = sigv4.SignedRequest(
                scope["method"], (scope.get("raw_path") or quote(scope["path"]).encode()).decode("latin-1"),
                scope.get("query_string", b"").decode("latin-1"), headers, body,
            )  # fmt: skip
            try:
                credential = sigv4.verify(request, self.config.sigv4, region=self.config.region)
            except sigv4.SigV4Error as exc:
                raise Refusal(False, exc.kind.value, str(exc)) from None
            return credential.name, receive
        given = _given_api_key(headers)
        if given is None:
            raise Refusal(True, "MissingAuthenticationTokenException", "no credential")
        return self._match_key(given), receive

    def _match_key(self, given: str) -> str:
        raw = given.encode("latin-1")  # as the header arrived
        digest = key_digest(raw)
        found = None
        for key in self.config.api_keys:  # every key compared: the time does not depend on which matched
            if hmac.compare_digest(digest, key.digest):
                found = key.name
        if found is None:
            raise Refusal(False, "UnrecognizedClientException", f"unknown API key {short_hash(raw)}")
        return found


async def _read_body(receive: Receive) -> tuple[bytes, Receive]:
    """The whole body (the outer middleware's size limit applies), and a `receive` that replays it."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise Refusal(False, "InvalidSignatureException", "the client left before its body arrived")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    pending: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return pending[0]["body"], replay


def _request_id(scope: Scope) -> str:
    return scope.get("state", {}).get("request_id", "-")


def _aws_response(status: int, code: str, message: str, request_id: str, headers: dict | None = None):
    body = {**envelope(message, "authentication_error" if status != 429 else "rate_limit_error"),
            "message": message}  # fmt: skip
    extra = {"x-amzn-ErrorType": code, "x-amzn-RequestId": request_id, **(headers or {})}
    return JSONResponse(body, status_code=status, headers=extra)


def _refusal_response(path: str, refusal: Refusal, request_id: str) -> JSONResponse:
    if RUNTIME_PATH.match(path):
        return _aws_response(403, refusal.aws_code, AWS_MESSAGES[refusal.aws_code], request_id)
    challenge = {"WWW-Authenticate": 'Bearer realm="gpt2serve"'}
    if refusal.missing:
        message = (
            "this server needs a credential: an API key (Authorization: Bearer KEY) or a SigV4 signature"
        )
        return JSONResponse(envelope(message, "authentication_error"), 401, headers=challenge)
    message = "the request's credential was not accepted"
    status = 401 if path.startswith("/v1/") else 403  # OpenAI answers a wrong key with 401
    return JSONResponse(envelope(message, "authentication_error"), status, headers=challenge)


def _quota_response(path: str, exc: QuotaExceededError, request_id: str) -> JSONResponse:
    retry = {"Retry-After": str(exc.retry_after_s)}
    if RUNTIME_PATH.match(path):
        return _aws_response(429, "ThrottlingException", exc.message, request_id, retry)
    return JSONResponse(envelope(exc.message, exc.type, exc.param), 429, headers=retry)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def install_auth(app: FastAPI, settings: Settings) -> None:
    """Add the auth middleware (when keys are configured) and CORS (when origins are), inside the request
    context middleware; put key usage on the app's /metrics; warn about an open server."""
    config = load_auth_config(settings)
    if config.enabled:
        usages = {name: KeyUsage(name, quota) for name, quota in config.quotas().items()}
        registry = app.state.metrics.registry
        refused = Counter(
            "gpt2serve_auth_refused", "Requests refused for a missing or an invalid credential.",
            ["reason"], registry=registry,
        )  # fmt: skip
        app.add_middleware(AuthMiddleware, config=config, usages=usages, refused=refused)
        registry.register(UsageCollector(usages))
        logger.info("auth on: %d API key(s), %d SigV4 key pair(s)", len(config.api_keys), len(config.sigv4))
    elif not is_loopback(settings.host):
        logger.warning(
            "listening on %s with no API keys or SigV4 credentials: anyone who can reach the port can "
            "generate (see --api-key, --sigv4-credentials)", settings.host,
        )  # fmt: skip
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
            allow_headers=["*"], expose_headers=["X-Request-Id", "Retry-After"],
        )  # fmt: skip
