"""The servicer with a real worker behind it (both in process, real TLS): it builds the worker's
request from the resolved call and never writes into the caller's; a worker that lost its keys is
attested again and called once more; an end-to-end prompt travels as the caller sealed it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from airlock import AsyncClient, AttestationPolicy
from airlock.attestation import HpkeKey
from airlock.v1 import inference_pb2 as pb
from airlock.v1 import inference_pb2_grpc
from gateway.server import InferenceService
from tests.gateway.inprocess import LIMITS, Site, gateway_site


class Untouched(InferenceService):
    """The real servicer, checking that the caller's message is the same bytes after the call."""

    changed: list[str]

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        sent = request.SerializeToString()
        try:
            return await super().Generate(request, context)
        finally:
            if request.SerializeToString() != sent:
                self.changed.append("Generate")

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        sent = request.SerializeToString()
        try:
            async for chunk in super().GenerateStream(request, context):
                yield chunk
        finally:
            if request.SerializeToString() != sent:
                self.changed.append("GenerateStream")


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    Untouched.changed = []
    async with gateway_site(tmp_path, Untouched) as site:
        yield site


def client(site: Site, **options: object) -> AsyncClient:
    return AsyncClient(site.address, token=site.token(), ca_cert=site.pki.ca_cert, **options)  # type: ignore[arg-type]


async def test_the_worker_gets_a_request_built_from_the_call_and_the_callers_stays_as_sent(
    site: Site,
) -> None:
    sent = pb.GenerateRequest(
        messages=[pb.ChatMessage(role="user", content="relay me")]
    )  # no id, model, params
    metadata = [("authorization", f"Bearer {site.token()}"), ("x-request-id", "rid-raw")]
    credentials = grpc.ssl_channel_credentials(site.pki.ca_cert.read_bytes())
    async with grpc.aio.secure_channel(site.address, credentials) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        reply = await stub.Generate(sent, metadata=metadata, timeout=10)
        chunks = [c async for c in stub.GenerateStream(sent, metadata=metadata, timeout=10)]
    assert (reply.text, reply.request_id, reply.model) == ("relay me", "rid-raw", "echo")
    assert "".join(c.text for c in chunks) == "relay me"
    assert Untouched.changed == []
    [generate, stream] = site.records("request")
    for record, method in ((generate, "generate"), (stream, "stream")):
        assert record == record | {
            "method": method, "outcome": "ok", "request_id": "rid-raw", "model": "echo",
            "max_tokens": LIMITS.default_max_tokens, "request_bytes": sent.ByteSize(),
        }  # fmt: skip
    assert site.worker.requests_started == 2


async def test_a_worker_that_lost_its_keys_is_attested_again_and_called_once_more(site: Site) -> None:
    attestor = site.worker.attestor
    async with client(site) as c:
        assert (await c.generate("first", model="echo")).text == "first"
        attestor.keys = {}  # as after a restart: the gateway's release is gone
        assert (await c.generate("again", model="echo")).text == "again"
        attestor.keys = {}
        assert "".join([x.text async for x in c.stream("streamed", model="echo")]) == "streamed"
    assert len(site.records("key_release")) == 3
    assert [r["outcome"] for r in site.records("request")] == ["ok", "ok", "ok"]
    assert Untouched.changed == []


async def test_an_end_to_end_prompt_reaches_the_worker_as_sealed_and_a_stale_seal_is_retried(
    site: Site,
) -> None:
    e2e = {"end_to_end": AttestationPolicy(), "worker_ca": site.pki.attest_ca_cert}
    async with client(site, **e2e) as c:
        assert (await c.generate("sealed end to end", model="echo")).text == "sealed end to end"
        site.worker.attestor.hpke = HpkeKey(site.worker.attestor.hpke.suite)  # the worker restarted
        assert (await c.generate("after a restart", model="echo")).text == "after a restart"
        site.worker.attestor.hpke = HpkeKey(site.worker.attestor.hpke.suite)
        assert "".join([x.text async for x in c.stream("streamed", model="echo")]) == "streamed"
    assert site.records("key_release") == []  # the gateway holds nothing that opens these
    outcomes = [(r["outcome"], r["reason"]) for r in site.records("request")]
    stale = ("error", "ATTESTATION_STALE")  # the SDK's first try after each restart, then once more
    assert outcomes == [("ok", ""), stale, ("ok", ""), stale, ("ok", "")]
    assert Untouched.changed == []
