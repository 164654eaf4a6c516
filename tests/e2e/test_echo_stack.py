"""End to end through real gateway and worker processes (EchoEngine workers, real TLS and JWTs)."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from airlock import (
    AsyncClient,
    AuthenticationError,
    DeadlineExceededError,
    InvalidRequestError,
    QuotaExceededError,
    UnavailableError,
)
from airlock.v1 import inference_pb2 as pb
from airlock.v1 import worker_pb2, worker_pb2_grpc
from serving.settings import WorkerSettings
from tests.conftest import ECHO_TOML
from tests.support import LiveStack

WORDS = " ".join(f"w{i}" for i in range(200))


async def test_unary_and_stream_answer(echo_stack: LiveStack) -> None:
    async with echo_stack.client() as client:
        answer = await client.generate("hello airlock world", model="echo")
        assert answer.text == "hello airlock world"
        assert (answer.prompt_tokens, answer.completion_tokens) == (3, 3)
        assert answer.finish_reason == "stop"
        assert answer.model == "echo"
        chunks = [c async for c in client.stream("one two three four", model="echo")]
    assert "".join(c.text for c in chunks) == "one two three four"
    # What piles up while a chunk is on its way goes as one chunk (serving/streams.py): count tokens.
    assert sum(c.tokens for c in chunks) == 4
    assert chunks[-1].finish_reason == "stop" and chunks[-1].completion_tokens == 4
    assert all(c.finish_reason is None for c in chunks[:-1])


async def test_request_id_is_echoed_or_generated(echo_stack: LiveStack) -> None:
    async with echo_stack.client() as client:
        mine = await client.generate("x", model="echo", request_id="req-42")
        generated = await client.generate("x", model="echo")
    assert mine.request_id == "req-42"
    assert len(generated.request_id) == 32


async def test_default_model_and_list_models(echo_stack: LiveStack) -> None:
    async with echo_stack.client("acme") as acme, echo_stack.client("globex") as globex:
        assert await acme.list_models() == ["echo", "slow"]
        assert await globex.list_models() == ["echo"]
        assert (await acme.generate("hi")).model == "echo"
        # globex has no "slow" model: it can't reach acme's worker by naming it.
        with pytest.raises(InvalidRequestError) as err:
            await globex.generate("hi", model="slow")
    assert err.value.reason == "UNKNOWN_MODEL" and err.value.field == "model"


async def test_token_tenant_selects_the_worker(echo_stack: LiveStack) -> None:
    before = {t: (await echo_stack.worker_info(t, "echo")).requests_started for t in ("acme", "globex")}
    async with echo_stack.client("acme") as acme, echo_stack.client("globex") as globex:
        for _ in range(3):
            await acme.generate("a", model="echo")
        await globex.generate("g", model="echo")
    after = {t: await echo_stack.worker_info(t, "echo") for t in ("acme", "globex")}
    assert after["acme"].tenant == "acme" and after["globex"].tenant == "globex"
    assert after["acme"].requests_started - before["acme"] == 3
    assert after["globex"].requests_started - before["globex"] == 1


async def _started_total(stack: LiveStack) -> int:
    total = 0
    for tenant, model in stack.stack.workers:
        total += (await stack.worker_info(tenant, model)).requests_started
    return total


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, "TOKEN_MISSING"),
        ("not-a-jwt", "TOKEN_MALFORMED"),
        ("expired", "TOKEN_EXPIRED"),
        ("wrong-audience", "TOKEN_BAD_AUDIENCE"),
    ],
)
async def test_bad_tokens_are_unauthenticated_and_dispatch_nothing(
    echo_stack: LiveStack, token: str | None, reason: str
) -> None:
    import dataclasses

    from control.tokens import mint_dev_token

    if token == "expired":
        token = echo_stack.token(ttl_seconds=-120)
    elif token == "wrong-audience":
        auth = dataclasses.replace(echo_stack.config.auth, audience="someone-else")
        token = mint_dev_token(echo_stack.pki, auth, tenant="acme", subject="x")
    before = await _started_total(echo_stack)
    async with AsyncClient(echo_stack.address, token=token, ca_cert=echo_stack.pki.ca_cert) as client:
        with pytest.raises(AuthenticationError) as unary:
            await client.generate("hi", model="echo")
        with pytest.raises(AuthenticationError) as streamed:
            [c async for c in client.stream("hi", model="echo")]
        with pytest.raises(AuthenticationError):
            await client.list_models()
    assert unary.value.reason == reason and streamed.value.reason == reason
    if token:
        assert token not in unary.value.message
    assert await _started_total(echo_stack) == before


async def test_a_token_for_a_tenant_the_policy_does_not_know_is_refused(echo_stack: LiveStack) -> None:
    # No issuer may speak for a tenant missing from policy/tenants.toml; the refusal says so.
    async with echo_stack.client("initech") as client:
        with pytest.raises(AuthenticationError) as err:
            await client.generate("hi")
    assert err.value.reason == "TOKEN_TENANT_UNKNOWN"
    assert err.value.message == "tenant 'initech' is not served here"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt": []}, "messages"),
        ({"prompt": [("robot", "hi")]}, "messages[0].role"),
        ({"max_tokens": 0}, "params.max_tokens"),
        ({"max_tokens": -5}, "params.max_tokens"),
        ({"max_tokens": 513}, "params.max_tokens"),
        ({"model": "no-such-model"}, "model"),
        ({"temperature": 3.0}, "params.temperature"),
        ({"request_id": "../../etc"}, "request_id"),
    ],
)
async def test_bad_requests_are_invalid_argument(
    echo_stack: LiveStack, kwargs: dict[str, object], field: str
) -> None:
    prompt = kwargs.pop("prompt", "hello")
    async with echo_stack.client() as client:
        with pytest.raises(InvalidRequestError) as err:
            await client.generate(prompt, **kwargs)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError):
            [c async for c in client.stream(prompt, **kwargs)]  # type: ignore[arg-type]
    assert err.value.field == field


async def test_oversized_message_is_resource_exhausted(echo_stack: LiveStack) -> None:
    async with echo_stack.client() as client:
        with pytest.raises(QuotaExceededError) as err:
            await client.generate("x" * 100_000, model="echo")
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_short_deadline_is_deadline_exceeded_and_stops_the_engine(echo_stack: LiveStack) -> None:
    async with echo_stack.client() as client:
        with pytest.raises(DeadlineExceededError):
            await client.generate(WORDS, model="slow", max_tokens=200, timeout=0.5)
        with pytest.raises(DeadlineExceededError):
            [c async for c in client.stream(WORDS, model="slow", max_tokens=200, timeout=0.5)]
    # The deadline travelled to the worker: its engine stops instead of finishing 200 tokens.
    await _wait_idle(echo_stack, "acme", "slow")
    first = (await echo_stack.worker_info("acme", "slow")).produced_tokens
    await asyncio.sleep(0.5)
    assert (await echo_stack.worker_info("acme", "slow")).produced_tokens == first


async def _wait_idle(stack: LiveStack, tenant: str, model: str, limit: float = 10.0) -> None:
    end = time.monotonic() + limit
    while (await stack.worker_info(tenant, model)).active and time.monotonic() < end:
        await asyncio.sleep(0.05)
    assert (await stack.worker_info(tenant, model)).active == 0


async def test_client_cancel_aborts_generation(echo_stack: LiveStack) -> None:
    async with echo_stack.client() as client:
        stream = client.stream(WORDS, model="slow", max_tokens=200)
        got = [await stream.__anext__() for _ in range(3)]
        await stream.aclose()  # type: ignore[attr-defined]
    assert len(got) == 3
    await _wait_idle(echo_stack, "acme", "slow")
    produced = (await echo_stack.worker_info("acme", "slow")).produced_tokens
    await asyncio.sleep(0.6)
    assert (await echo_stack.worker_info("acme", "slow")).produced_tokens == produced


async def test_worker_refuses_other_tenants_and_other_peers(echo_stack: LiveStack) -> None:
    request = worker_pb2.WorkerRequest(
        tenant="globex",
        request=pb.GenerateRequest(request_id="r1", messages=[pb.ChatMessage(role="user", content="hi")]),
    )
    async with echo_stack.worker_channel("acme", "echo") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as wrong_tenant:
            await worker_pb2_grpc.WorkerStub(channel).Generate(request, timeout=5)
    assert wrong_tenant.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # A certificate from the same CA that is not the gateway's is not enough.
    async with echo_stack.worker_channel("acme", "echo", as_worker=True) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as wrong_peer:
            await worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.WorkerInfoRequest(), timeout=5)
    assert wrong_peer.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # No client certificate at all: the TLS handshake fails.
    port = echo_stack.stack.workers[("acme", "echo")].port
    creds = grpc.ssl_channel_credentials(echo_stack.pki.ca_cert.read_bytes())
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as no_cert:
            await worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.WorkerInfoRequest(), timeout=5)
    assert no_cert.value.code() == grpc.StatusCode.UNAVAILABLE


def test_each_worker_runs_from_its_own_settings_file(echo_stack: LiveStack) -> None:
    """One contract: the worker's command line names its settings file and nothing the file says."""
    for key, child in echo_stack.stack.workers.items():
        path = echo_stack.stack.settings_file(key)
        argv = Path(f"/proc/{child.process.pid}/cmdline").read_bytes().split(b"\0")[1:-1]
        assert argv[:4] == [b"-m", b"worker", b"--settings", str(path).encode()]
        assert [a for a in argv[4:] if a.startswith(b"--")] == [b"--ready-file", b"--log-level"]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        settings = WorkerSettings.load(path)
        assert settings == echo_stack.stack.settings[key]
        assert list(settings.tenant_names) == child.info["tenants"] and settings.model == key[1]
        assert settings.listen == f"127.0.0.1:{child.port}"  # where a restart binds again


async def test_gateway_has_no_plaintext_port(echo_stack: LiveStack) -> None:
    async with grpc.aio.insecure_channel(echo_stack.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_health_and_reflection(echo_stack: LiveStack) -> None:
    creds = grpc.ssl_channel_credentials(echo_stack.pki.ca_cert.read_bytes())
    metadata = (("authorization", f"Bearer {echo_stack.token()}"),)
    async with grpc.aio.secure_channel(echo_stack.address, creds) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "airlock.v1.Inference"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        gateway_services = await _list_services(channel, metadata)
    assert "airlock.v1.Inference" in gateway_services
    async with echo_stack.worker_channel("acme", "echo") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="airlock.v1.Worker"), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert "airlock.v1.Worker" in await _list_services(channel, ())


async def _list_services(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=metadata, timeout=5
    )
    async for reply in call:
        return {s.name for s in reply.list_services_response.service}
    return set()


async def test_reflection_needs_a_token(echo_stack: LiveStack) -> None:
    creds = grpc.ssl_channel_credentials(echo_stack.pki.ca_cert.read_bytes())
    async with grpc.aio.secure_channel(echo_stack.address, creds) as channel:
        # Refused before any request is read: sending none avoids racing the client's first write
        # against the server's early status (gRPC then reports its own INTERNAL, not the status).
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(timeout=5)
        assert await call.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_killed_worker_gives_unavailable_quickly(make_stack) -> None:  # type: ignore[no-untyped-def]
    # Restarts off: the worker must stay down for the second call (tests/e2e/test_supervisor.py
    # covers the restart).
    live: LiveStack = make_stack(ECHO_TOML + "\n[supervisor]\nrestart = false\n")
    victim = live.stack.workers[("acme", "slow")].process
    async with live.client("acme") as acme, live.client("globex") as globex:
        stream = acme.stream(WORDS, model="slow", max_tokens=200)
        await stream.__anext__()
        os.kill(victim.pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            async for _ in stream:
                pass
        # Bound generously (shared machines); a hang would hit the 120 s client timeout instead.
        assert time.monotonic() - started < 3.0
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            await acme.generate("hi", model="slow", timeout=30)
        assert time.monotonic() - started < 3.0
        # Another tenant's worker is untouched.
        assert (await globex.generate("still here", model="echo")).text == "still here"


async def test_sigterm_drains_streams_and_refuses_new_calls(make_stack) -> None:  # type: ignore[no-untyped-def]
    live: LiveStack = make_stack()
    gateway = live.stack.gateway
    assert gateway is not None
    async with live.client("acme") as client:
        stream = client.stream(" ".join(["word"] * 30), model="slow", max_tokens=30)
        first = await stream.__anext__()
        gateway.process.send_signal(signal.SIGTERM)
        await _wait_until_refusing(live)
        with pytest.raises(UnavailableError):
            await client.generate("new call", model="echo", timeout=5)
        rest = [c async for c in stream]
    assert rest[-1].finish_reason == "length" or rest[-1].finish_reason == "stop"
    assert rest[-1].completion_tokens == 30
    assert first.text + "".join(c.text for c in rest) == " ".join(["word"] * 30)
    assert gateway.process.wait(timeout=15) == 0


async def _wait_until_refusing(live: LiveStack, limit: float = 10.0) -> None:
    """Poll the health service until the draining gateway refuses new calls outright."""
    creds = grpc.ssl_channel_credentials(live.pki.ca_cert.read_bytes())
    end = time.monotonic() + limit
    async with grpc.aio.secure_channel(live.address, creds) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < end:
            try:
                await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.aio.AioRpcError:
                return
            await asyncio.sleep(0.02)
    raise AssertionError("the gateway kept accepting calls after SIGTERM")
