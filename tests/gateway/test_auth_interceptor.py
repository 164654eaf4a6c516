"""The guard (a real TLS gateway server, in process): refused calls never reach servicer code, and a
call that does arrives resolved once, in the order security needs: authenticate, authorize on a
bounded model name, only then validate and route (so only an authorized caller learns whether a
model exists)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from airlock import AsyncClient, AuthenticationError, InvalidRequestError, PermissionDeniedError
from airlock.rpcstatus import from_rpc_error
from airlock.v1 import inference_pb2 as pb
from airlock.v1 import inference_pb2_grpc
from gateway.call import Call, Generation, current_call
from gateway.config import AuditConfig
from gateway.server import InferenceService
from tests.gateway.inprocess import LIMITS, Site, gateway_site


class SpyService(InferenceService):
    """The real servicer, its generation methods replaced by a spy of what they are given."""

    calls: list[Call]
    requests: list[bytes]

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        self.calls.append(current_call(Generation))
        self.requests.append(request.SerializeToString())
        return pb.GenerateResponse(request_id="spy", text="ok")

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        self.calls.append(current_call(Generation))
        self.requests.append(request.SerializeToString())
        yield pb.GenerateChunk(request_id="spy", text="ok", finish_reason=pb.FINISH_REASON_STOP)


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    SpyService.calls, SpyService.requests = [], []
    async with gateway_site(tmp_path, SpyService) as site:
        yield site


def spied(site: Site) -> SpyService:
    assert isinstance(site.service, SpyService)
    return site.service


async def raw_generate(site: Site, request: pb.GenerateRequest, token: str, request_id: str = "") -> None:
    metadata = [("authorization", f"Bearer {token}")] + ([("x-request-id", request_id)] if request_id else [])
    credentials = grpc.ssl_channel_credentials(site.pki.ca_cert.read_bytes())
    async with grpc.aio.secure_channel(site.address, credentials) as channel:
        await inference_pb2_grpc.InferenceStub(channel).Generate(request, metadata=metadata, timeout=10)


async def test_servicer_runs_only_for_verified_authorized_callers(site: Site) -> None:
    good = site.token()
    expired = site.token(ttl_seconds=-300)
    for token in (None, "", "abc.def.ghi", expired, good + "x"):
        async with AsyncClient(site.address, token=token, ca_cert=site.pki.ca_cert) as client:
            with pytest.raises(AuthenticationError):
                await client.generate("hi")
            with pytest.raises(AuthenticationError):
                [c async for c in client.stream("hi")]
    # Verified but not allowed: a subject without a role, or another tenant's.
    stranger = site.token(subject="stranger")
    for token, tenant in ((stranger, None), (good, "globex")):
        async with AsyncClient(site.address, token=token, ca_cert=site.pki.ca_cert, tenant=tenant) as c:
            with pytest.raises(PermissionDeniedError):
                await c.generate("hi")
            with pytest.raises(PermissionDeniedError):
                [x async for x in c.stream("hi")]
    assert spied(site).calls == []
    async with AsyncClient(site.address, token=good, ca_cert=site.pki.ca_cert) as client:
        assert (await client.generate("hi")).text == "ok"
        assert [c.text async for c in client.stream("hi")] == ["ok"]
    assert [(c.action, c.tenant) for c in spied(site).calls] == [("generate", "acme"), ("stream", "acme")]
    denied = site.metrics.registry.get_sample_value(
        "airlock_authz_decisions_total", {"tenant": "globex", "decision": "deny"}
    )
    assert denied == 2


async def test_the_servicer_gets_the_call_resolved_once_and_the_callers_request_as_sent(site: Site) -> None:
    sent = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="hi")])  # no id, model, params
    await raw_generate(site, sent, site.token(), request_id="rid-1")
    [call] = spied(site).calls
    assert isinstance(call, Generation)
    assert (call.principal.policy_subject, call.tenant, call.action, call.resource, call.request_id) == (
        "acme/tester", "acme", "generate", "model:echo", "rid-1",
    )  # fmt: skip
    assert call.model == call.spec.model == "echo"  # the tenant's default, resolved
    assert (call.spec.request_id, call.spec.sampling.max_tokens) == ("rid-1", LIMITS.default_max_tokens)
    assert call.quota is not None and call.quota.concurrent_streams == 64  # acme's, from the policy
    assert spied(site).requests == [sent.SerializeToString()]  # nothing written into the caller's message


async def test_only_an_authorized_caller_learns_whether_a_model_exists(site: Site) -> None:
    hello = [pb.ChatMessage(role="user", content="hi")]
    cases = [  # (token, model, messages) -> (reason, audited events)
        (site.token(subject="stranger"), "nope", hello, "POLICY_DENIED", ["authorization"]),
        (site.token(subject="stranger"), "echo", [], "POLICY_DENIED", ["authorization"]),
        (site.token(), "Not-A-Name", hello, "MODEL_INVALID", []),  # refused before it is audited
        (site.token(), "nope", hello, "UNKNOWN_MODEL", ["authorization", "request"]),
        (site.token(), "echo", [], "INVALID_ARGUMENT", ["authorization", "request"]),
    ]
    for i, (token, model, messages, reason, events) in enumerate(cases):
        before = len(site.records())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await raw_generate(site, pb.GenerateRequest(model=model, messages=messages), token, f"case-{i}")
        assert from_rpc_error(info.value).reason == reason, i
        assert [r["event"] for r in site.records()[before:]] == events, i
    assert spied(site).calls == []


async def test_a_refused_generation_is_audited_as_a_request_of_the_authorized_caller(site: Site) -> None:
    async with AsyncClient(site.address, token=site.token(), ca_cert=site.pki.ca_cert) as client:
        with pytest.raises(InvalidRequestError) as err:
            await client.generate("hi", model="nope")
    assert (err.value.reason, err.value.field) == ("UNKNOWN_MODEL", "model")
    [allowed] = site.records("authorization")
    [request] = site.records("request")
    assert allowed["request_id"] == err.value.request_id and allowed["resource"] == "model:nope"
    assert request == request | {
        "tenant": "acme", "subject": "acme/tester", "method": "generate", "outcome": "error",
        "code": "INVALID_ARGUMENT", "reason": "UNKNOWN_MODEL",
    }  # fmt: skip
    labels = {"tenant": "acme", "method": "generate", "code": "INVALID_ARGUMENT"}
    assert site.metrics.registry.get_sample_value("airlock_requests_total", labels) == 1


class WriteAheadSpy(InferenceService):
    """A servicer that looks, when it runs, at what the audit trail holds and has fsynced."""

    path: Path
    seen: list[tuple[bool, bool]]  # (its authorization record is in the file, and was fsynced)
    synced: list[int]  # the log's size at each of its fsyncs

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        call = current_call(Generation)
        data, end = self.path.read_bytes(), 0
        for line in data.splitlines(keepends=True):
            end += len(line)
            record = json.loads(line)
            if record["event"] == "authorization" and record["request_id"] == call.request_id:
                self.seen.append((True, max(self.synced, default=0) >= end))
                break
        else:
            self.seen.append((False, False))
        return pb.GenerateResponse(request_id=call.request_id, text="ok")


async def test_with_fsync_always_an_allowed_call_runs_only_once_its_authorization_is_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    WriteAheadSpy.path, WriteAheadSpy.seen, WriteAheadSpy.synced = tmp_path / "audit.jsonl", [], []
    real = os.fsync

    def fsync(fd: int) -> None:
        real(fd)
        if os.readlink(f"/proc/self/fd/{fd}") == str(WriteAheadSpy.path):
            WriteAheadSpy.synced.append(os.fstat(fd).st_size)

    monkeypatch.setattr(os, "fsync", fsync)
    config = AuditConfig(fsync="always", sign_every_seconds=0)
    async with (
        gateway_site(tmp_path, WriteAheadSpy, audit_config=config) as site,
        AsyncClient(site.address, token=site.token(), ca_cert=site.pki.ca_cert) as client,
    ):
        await asyncio.gather(*(client.generate("hi", request_id=f"req-{i}") for i in range(8)))
    assert WriteAheadSpy.seen == [(True, True)] * 8
