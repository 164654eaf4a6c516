"""What the gateway tells callers about itself (issue 15, items 6 and 7).

Health: the server's overall status answers anyone (load balancers probe it without credentials), a
tenant's own status only that tenant's callers; nobody learns which tenants exist, and `List` is
refused cleanly. Reflection: only the public service (and health, reflection) is described; the
internal worker API (`ReleaseKeys`, `KeyRelease`) and the operators' Admin API are unknown to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from airlock.rpcstatus import from_rpc_error
from control.pki import issue_service_cert
from tests.support import LiveStack

SERVING = health_pb2.HealthCheckResponse.SERVING


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def tls(stack: LiveStack, cert: Path | None = None, key: Path | None = None) -> grpc.ChannelCredentials:
    pair = (key.read_bytes(), cert.read_bytes()) if cert and key else (None, None)
    return grpc.ssl_channel_credentials(stack.pki.ca_cert.read_bytes(), *pair)


async def check(
    stack: LiveStack, service: str, metadata: tuple[tuple[str, str], ...] = (), *, address: str = "",
    credentials: grpc.ChannelCredentials | None = None,
) -> str:  # fmt: skip
    """SERVING / NOT_SERVING, or the refusal's code and reason (`NOT_FOUND`, `UNAUTHENTICATED/...`)."""
    async with grpc.aio.secure_channel(address or stack.address, credentials or tls(stack)) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=10, metadata=metadata
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                return f"UNAUTHENTICATED/{from_rpc_error(exc).reason}"
            return str(exc.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


# --- health ------------------------------------------------------------------------------------


async def test_overall_health_answers_anyone(echo_stack: LiveStack) -> None:
    assert await check(echo_stack, "") == "SERVING"
    assert await check(echo_stack, "airlock.v1.Inference") == "SERVING"


@pytest.mark.parametrize("name", ["acme", "globex", "no-such-tenant", "ACME", ""])
async def test_a_tenants_health_is_refused_without_a_credential(echo_stack: LiveStack, name: str) -> None:
    # The same answer whether the tenant exists or not: no probing for tenant names.
    assert await check(echo_stack, f"tenant/{name}") == "UNAUTHENTICATED/TOKEN_MISSING"
    assert await check(echo_stack, f"tenant/{name}", bearer("not-a-jwt")) == "UNAUTHENTICATED/TOKEN_MALFORMED"


async def test_a_tenants_health_answers_that_tenants_callers_only(echo_stack: LiveStack) -> None:
    acme = bearer(echo_stack.token("acme"))
    assert await check(echo_stack, "tenant/acme", acme) == "SERVING"
    # Another tenant that exists and one that doesn't look exactly alike.
    assert await check(echo_stack, "tenant/globex", acme) == "NOT_FOUND"
    assert await check(echo_stack, "tenant/no-such-tenant", acme) == "NOT_FOUND"
    assert await check(echo_stack, "tenant/globex", bearer(echo_stack.token("globex"))) == "SERVING"
    # The tenant header does not widen it: health follows the verified identity.
    assert await check(echo_stack, "tenant/globex", (*acme, ("x-airlock-tenant", "globex"))) == "NOT_FOUND"


async def test_a_tenants_service_certificate_reads_its_health_on_the_mtls_port(
    echo_stack: LiveStack, tmp_path: Path
) -> None:
    issued = issue_service_cert(echo_stack.pki, tenant="acme", service="batch", out_dir=tmp_path)
    mtls = echo_stack.stack.mtls_address
    assert mtls is not None
    service = tls(echo_stack, issued.cert, issued.key)
    assert await check(echo_stack, "tenant/acme", address=mtls, credentials=service) == "SERVING"
    assert await check(echo_stack, "tenant/globex", address=mtls, credentials=service) == "NOT_FOUND"
    assert await check(echo_stack, "", address=mtls, credentials=service) == "SERVING"


async def test_watching_a_tenants_health_needs_that_tenant_too(echo_stack: LiveStack) -> None:
    async with grpc.aio.secure_channel(echo_stack.address, tls(echo_stack)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        overall = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert (await overall.read()).status == SERVING
        overall.cancel()
        anonymous = stub.Watch(health_pb2.HealthCheckRequest(service="tenant/acme"), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await anonymous.read()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        acme = bearer(echo_stack.token("acme"))
        foreign = stub.Watch(
            health_pb2.HealthCheckRequest(service="tenant/globex"), timeout=10, metadata=acme
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await foreign.read()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        own = stub.Watch(health_pb2.HealthCheckRequest(service="tenant/acme"), timeout=10, metadata=acme)
        assert (await own.read()).status == SERVING
        own.cancel()


async def test_health_list_is_unimplemented_without_a_traceback(echo_stack: LiveStack) -> None:
    log = echo_stack.stack.gateway.log if echo_stack.stack.gateway else None
    assert log is not None
    before = log.read_text(errors="replace").count("Traceback")
    async with grpc.aio.secure_channel(echo_stack.address, tls(echo_stack)) as channel:
        for metadata in ((), bearer(echo_stack.token("acme"))):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await health_pb2_grpc.HealthStub(channel).List(
                    health_pb2.HealthListRequest(), timeout=10, metadata=metadata
                )
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "tenant/" not in (err.value.details() or "")
    await asyncio.sleep(0.5)  # the gateway's log is written by another process
    assert log.read_text(errors="replace").count("Traceback") == before


# --- reflection --------------------------------------------------------------------------------


async def reflect(
    stack: LiveStack, requests: list[reflection_pb2.ServerReflectionRequest], token: str
) -> list[reflection_pb2.ServerReflectionResponse]:
    async def send() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        for request in requests:
            yield request

    async with grpc.aio.secure_channel(stack.address, tls(stack)) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(send(), timeout=10, metadata=bearer(token))
        return [reply async for reply in call]


def files(reply: reflection_pb2.ServerReflectionResponse) -> list[descriptor_pb2.FileDescriptorProto]:
    return [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in reply.file_descriptor_response.file_descriptor_proto
    ]


async def test_reflection_lists_and_describes_only_the_public_service(echo_stack: LiveStack) -> None:
    token = echo_stack.token("acme")
    ask = reflection_pb2.ServerReflectionRequest
    listed, inference = await reflect(
        echo_stack, [ask(list_services=""), ask(file_containing_symbol="airlock.v1.Inference")], token
    )
    names = {s.name for s in listed.list_services_response.service}
    assert names == {
        "airlock.v1.Inference",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    described = files(inference)
    assert [f.name for f in described] == ["airlock/v1/inference.proto"]
    assert {s.name for s in described[0].service} == {"Inference"}
    # A generated client can still be built from it: the request and response types are there.
    assert {"GenerateRequest", "GenerateResponse", "GenerateChunk"} <= {
        m.name for m in described[0].message_type
    }


@pytest.mark.parametrize(
    "request_kind",
    [
        ("file_containing_symbol", "airlock.v1.Worker"),
        ("file_containing_symbol", "airlock.v1.Worker.ReleaseKeys"),
        ("file_containing_symbol", "airlock.v1.KeyRelease"),
        ("file_containing_symbol", "airlock.v1.TenantKeys"),
        ("file_containing_symbol", "airlock.v1.WorkerRequest"),
        ("file_containing_symbol", "airlock.v1.Admin"),
        ("file_containing_symbol", "airlock.v1.ClearLockoutsRequest"),
        ("file_by_filename", "airlock/v1/worker.proto"),
        ("file_by_filename", "airlock/v1/admin.proto"),
    ],
)
async def test_reflection_knows_nothing_of_the_internal_apis(
    echo_stack: LiveStack, request_kind: tuple[str, str]
) -> None:
    field, value = request_kind
    (reply,) = await reflect(
        echo_stack, [reflection_pb2.ServerReflectionRequest(**{field: value})], echo_stack.token("acme")
    )
    assert reply.WhichOneof("message_response") == "error_response"
    assert reply.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert b"worker" not in reply.SerializeToString().replace(value.encode(), b"").lower()


async def test_reflection_needs_a_credential(echo_stack: LiveStack) -> None:
    # The guard refuses the call before it reads a request, so none is sent: a request written
    # while the refusal is on its way fails on the client's side with a bare INTERNAL instead.
    async with grpc.aio.secure_channel(echo_stack.address, tls(echo_stack)) as channel:
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            _ = [reply async for reply in call]
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
