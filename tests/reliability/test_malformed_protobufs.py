"""Raw bytes, not protobufs, sent to every gateway method over a generic gRPC channel (real TLS, a
valid token): truncated varints, wrong wire types, huge length prefixes, nested garbage, messages
over `max_message_bytes`. Each gets a clean status, never INTERNAL or UNKNOWN, and the gateway keeps
serving."""

from __future__ import annotations

import random

import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from airlock.v1 import inference_pb2 as pb
from tests.support import LiveStack

METHODS = {
    "/airlock.v1.Inference/Generate": (pb.GenerateRequest, "unary"),
    "/airlock.v1.Inference/GenerateStream": (pb.GenerateRequest, "stream"),
    "/airlock.v1.Inference/ListModels": (pb.ListModelsRequest, "unary"),
    "/airlock.v1.Inference/GetAttestation": (pb.AttestationRequest, "unary"),
    "/grpc.health.v1.Health/Check": (health_pb2.HealthCheckRequest, "unary"),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": (
        reflection_pb2.ServerReflectionRequest,
        "bidi",
    ),
}


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _garbage() -> dict[str, bytes]:
    rng = random.Random(7)
    cases = {
        "empty": b"",
        "truncated varint": b"\x08\xff\xff",
        "truncated tag": b"\xff",
        "field zero": b"\x00\x01",
        "wrong wire type (varint for a string)": b"\x0a\x01" + b"\x12\x05hello" + b"\x08\x07",
        "wrong wire type (fixed64 for a message)": b"\x11" + b"\x00" * 8 + b"\x1a\x03abc",
        "huge length prefix": b"\x0a" + varint(2**31) + b"x",
        "length past the end": b"\x12\x7fabc",
        "unterminated group": b"\x0b\x08\x01",
        "stray end group": b"\x0c",
        "invalid utf-8 in a string": b"\x0a\x02\xff\xfe",
        "nested garbage": b"\x12"
        + varint(40)
        + b"\x0a\x1e"
        + bytes(range(200, 230))
        + b"\x12\x06\xff\xff\xff",
        "deep nesting": (b"\x12\x7f" * 60)[:120],
        "over max_message_bytes": b"\x0a" + varint(70_000) + b"a" * 70_000,
    }
    for i in range(12):
        cases[f"random {i}"] = rng.randbytes(rng.randint(1, 300))
    return cases


GARBAGE = _garbage()
CLEAN = {
    grpc.StatusCode.OK,  # bytes that happen to parse (protobuf skips unknown fields) and are fine
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,  # attestation of a model that has none to give
    grpc.StatusCode.NOT_FOUND,
}


async def _call(
    channel: grpc.aio.Channel, method: str, kind: str, data: bytes, token: str
) -> grpc.StatusCode:
    metadata = (("authorization", f"Bearer {token}"),)
    try:
        if kind == "unary":
            await channel.unary_unary(method)(data, metadata=metadata, timeout=20)
        elif kind == "stream":
            async for _ in channel.unary_stream(method)(data, metadata=metadata, timeout=20):
                pass
        else:  # one message up a client stream
            async for _ in channel.stream_stream(method)(iter([data]), metadata=metadata, timeout=20):
                pass
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("method", sorted(METHODS))
async def test_garbage_gets_a_clean_status_and_the_gateway_keeps_serving(
    echo_stack: LiveStack, method: str
) -> None:
    message, kind = METHODS[method]
    credentials = grpc.ssl_channel_credentials(echo_stack.pki.ca_cert.read_bytes())
    seen = {}
    async with grpc.aio.secure_channel(echo_stack.address, credentials) as channel:
        for name, data in GARBAGE.items():
            code = await _call(channel, method, kind, data, echo_stack.token())
            seen[name] = code
            try:
                message.FromString(data)
                parses = len(data) <= echo_stack.config.gateway.max_message_bytes
            except DecodeError:
                parses = False
            if not parses:  # what protobuf can't decode is the caller's mistake, and said so
                expected = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
                assert code in expected, (name, code)
    bad = {name: code for name, code in seen.items() if code not in CLEAN}
    assert not bad, bad
    async with echo_stack.client("globex") as client:  # still serving, and correctly
        assert (await client.generate("still serving", model="echo")).text == "still serving"
