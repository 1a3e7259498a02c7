"""AWS event-stream framing (`application/vnd.amazon.eventstream`): InvokeEndpointWithResponseStream's body.

A message is: a prelude (total length and headers length, big-endian uint32 each, then the CRC32 of
those 8 bytes), the headers, the payload, and the CRC32 of everything before it. A header is: name
length (uint8), name, value type (uint8; 7 = string), value length (uint16), value.

What botocore expects of the sagemaker-runtime `ResponseStream` union:
- `PayloadPart`: `:message-type` event, `:event-type` PayloadPart; its member `Bytes` is the event
  payload, a blob: the payload is the raw bytes of one chunk of the model's answer.
- `ModelStreamError`: `:message-type` exception, `:exception-type` ModelStreamError, a JSON payload
  `{"Message": ..., "ErrorCode": ...}`; botocore raises it as an EventStreamError while iterating.
"""

from __future__ import annotations

import json
import struct
import zlib

CONTENT_TYPE = "application/vnd.amazon.eventstream"
STRING_TYPE = 7
PRELUDE_LENGTH = 12  # total length, headers length, prelude CRC
MAX_PAYLOAD = 16 * 2**20  # botocore refuses larger messages
# The documented ModelStreamError codes.
TIMEOUT_CODE = "ModelInvocationTimeExceeded"
BROKEN_CODE = "StreamBroken"


def _crc(data: bytes, start: int = 0) -> int:
    return zlib.crc32(data, start) & 0xFFFFFFFF


def encode_headers(headers: dict[str, str]) -> bytes:
    """String-valued headers in event-stream wire form."""
    out = bytearray()
    for name, value in headers.items():
        raw_name, raw_value = name.encode("utf-8"), value.encode("utf-8")
        if len(raw_name) > 255 or len(raw_value) > 65535:
            raise ValueError(f"event-stream header {name!r} is too long")
        out += struct.pack("!B", len(raw_name)) + raw_name
        out += struct.pack("!BH", STRING_TYPE, len(raw_value)) + raw_value
    return bytes(out)


def encode_message(headers: dict[str, str], payload: bytes) -> bytes:
    """One complete event-stream message."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"event-stream payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    raw_headers = encode_headers(headers)
    total = PRELUDE_LENGTH + len(raw_headers) + len(payload) + 4
    prelude = struct.pack("!II", total, len(raw_headers))
    prelude += struct.pack("!I", _crc(prelude))
    body = prelude + raw_headers + payload
    return body + struct.pack("!I", _crc(body))


def payload_part(data: bytes) -> bytes:
    """A `PayloadPart` event carrying `data` (one chunk of the container's streamed answer)."""
    headers = {
        ":event-type": "PayloadPart",
        ":content-type": "application/octet-stream",
        ":message-type": "event",
    }
    return encode_message(headers, data)


def model_stream_error(message: str, error_code: str = BROKEN_CODE) -> bytes:
    """A `ModelStreamError` exception event: the stream ended with an error after it had begun."""
    headers = {
        ":exception-type": "ModelStreamError",
        ":content-type": "application/json",
        ":message-type": "exception",
    }
    payload = json.dumps({"Message": message[:2048], "ErrorCode": error_code}, ensure_ascii=False)
    return encode_message(headers, payload.encode("utf-8"))
