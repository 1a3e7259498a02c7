"""The AWS event-stream encoder, decoded by botocore's own decoder and sagemaker-runtime parser."""

from __future__ import annotations

import json

import botocore.session
import pytest
from botocore.eventstream import ChecksumMismatch, EventStream, EventStreamBuffer
from botocore.exceptions import EventStreamError
from botocore.parsers import EventStreamJSONParser

from gpt2serve.api import eventstream

CHUNKS = [b'data: {"index":0,"text":"Hello"}\n\n', "data: \u00e9t\u00e9 \u2603 \U0001f600\n\n".encode(), b""]


class RawStream:
    """What botocore's EventStream reads from: an object whose `stream()` yields byte chunks."""

    def __init__(self, data: bytes, piece: int):
        self.data, self.piece = data, piece

    def stream(self):
        for i in range(0, len(self.data), self.piece):
            yield self.data[i : i + self.piece]

    def close(self) -> None:
        pass


def decode(data: bytes, piece: int) -> list:
    buffer = EventStreamBuffer()
    messages = []
    for i in range(0, len(data), piece):
        buffer.add_data(data[i : i + piece])
        messages.extend(buffer)
    return messages


def response_stream(data: bytes, piece: int = 5) -> EventStream:
    """sagemaker-runtime's InvokeEndpointWithResponseStream body, parsed exactly as boto3 parses it."""
    model = botocore.session.get_session().get_service_model("sagemaker-runtime")
    operation = model.operation_model("InvokeEndpointWithResponseStream")
    shape = operation.output_shape.members["Body"]
    return EventStream(RawStream(data, piece), shape, EventStreamJSONParser(), operation.name)


@pytest.mark.parametrize("piece", [1, 7, 10_000])
def test_payload_parts_round_trip(piece: int) -> None:
    data = b"".join(eventstream.payload_part(c) for c in CHUNKS)
    messages = decode(data, piece)
    assert [m.payload for m in messages] == CHUNKS
    for m in messages:
        assert m.headers == {
            ":event-type": "PayloadPart",
            ":content-type": "application/octet-stream",
            ":message-type": "event",
        }


def test_botocore_parses_payload_parts_as_bytes() -> None:
    data = b"".join(eventstream.payload_part(c) for c in CHUNKS)
    assert list(response_stream(data)) == [{"PayloadPart": {"Bytes": c}} for c in CHUNKS]


def test_model_stream_error_is_raised_by_botocore() -> None:
    error = eventstream.model_stream_error("it broke \u2603", "StreamBroken")
    data = eventstream.payload_part(CHUNKS[0]) + error
    events = iter(response_stream(data))
    assert next(events) == {"PayloadPart": {"Bytes": CHUNKS[0]}}
    with pytest.raises(EventStreamError) as info:
        next(events)
    assert info.value.response["Error"] == {"Code": "ModelStreamError", "Message": "it broke \u2603"}
    timeout = eventstream.model_stream_error("x", "ModelInvocationTimeExceeded")
    payload = json.loads(decode(timeout, 64)[0].payload)
    assert payload == {"Message": "x", "ErrorCode": "ModelInvocationTimeExceeded"}


def test_checksums_are_checked() -> None:
    data = bytearray(eventstream.payload_part(b"some payload"))
    data[-6] ^= 0xFF  # a payload byte
    with pytest.raises(ChecksumMismatch):
        decode(bytes(data), 1000)


def test_lengths_in_the_prelude() -> None:
    message = eventstream.payload_part(b"abc")
    total = int.from_bytes(message[0:4], "big")
    headers_length = int.from_bytes(message[4:8], "big")
    assert total == len(message) and total == 12 + headers_length + 3 + 4


def test_limits() -> None:
    with pytest.raises(ValueError):
        eventstream.encode_headers({"x" * 256: "v"})
    with pytest.raises(ValueError):
        eventstream.encode_message({}, b"\0" * (eventstream.MAX_PAYLOAD + 1))
