"""The SDK against live stacks: request ids, token refresh, retries before output only, health per
tenant, cancellation from the sync client, and every error type from a real server condition."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import grpc
import pytest

from airlock import (
    AsyncClient,
    AuthenticationError,
    Client,
    DeadlineExceededError,
    InvalidRequestError,
    PermissionDeniedError,
    QuotaExceededError,
    UnavailableError,
)
from airlock.types import REQUEST_ID_HEADER
from airlock.v1 import inference_pb2 as pb
from airlock.v1 import inference_pb2_grpc
from tests.support import LiveStack

WORDS = " ".join(f"w{i}" for i in range(200))


async def test_the_request_id_is_sent_echoed_and_audited(echo_stack: LiveStack) -> None:
    async with echo_stack.client() as client:
        answer = await client.generate("hello", model="echo", request_id="sdk-rid-1")
        generated = await client.generate("hello", model="echo")
    assert answer.request_id == "sdk-rid-1"
    assert len(generated.request_id) == 32  # made by the SDK when the caller gives none
    # (the first call to a worker also releases it its keys, audited under the same request id)
    records = [r for r in echo_stack.audit_records(request_id="sdk-rid-1") if r["event"] != "key_release"]
    assert [r["event"] for r in records] == ["authorization", "request"]
    assert records[0]["decision"] == "allow" and records[0]["resource"] == "model:echo"
    request = records[1]  # who, what, outcome, sizes, tokens, latency; never the text
    assert (request["subject"], request["code"], request["model"]) == ("acme/tester", "OK", "echo")
    assert request["request_bytes"] > 0 and request["response_bytes"] > 0 and request["latency_ms"] > 0
    assert request["prompt_tokens"] == request["completion_tokens"] == 1
    assert "hello" not in json.dumps(records)


async def _raw_call(
    stack: LiveStack, body_id: str, header_id: str | None
) -> tuple[grpc.StatusCode, dict[str, str | bytes]]:
    credentials = grpc.ssl_channel_credentials(stack.pki.ca_cert.read_bytes())
    metadata = [("authorization", f"Bearer {stack.token()}")]
    if header_id is not None:
        metadata.append((REQUEST_ID_HEADER, header_id))
    request = pb.GenerateRequest(
        request_id=body_id, model="echo", messages=[pb.ChatMessage(role="user", content="hi")]
    )
    async with grpc.aio.secure_channel(stack.address, credentials) as channel:
        call = inference_pb2_grpc.InferenceStub(channel).Generate(request, metadata=metadata, timeout=10)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call
        trailing = dict(await call.trailing_metadata() or ())
        return await call.code(), trailing


async def test_the_request_id_comes_back_in_trailing_metadata(echo_stack: LiveStack) -> None:
    code, trailing = await _raw_call(echo_stack, "", "hdr-id-7")
    assert code == grpc.StatusCode.OK and trailing[REQUEST_ID_HEADER] == "hdr-id-7"
    code, trailing = await _raw_call(echo_stack, "", None)  # none given: the gateway makes one
    assert code == grpc.StatusCode.OK and len(trailing[REQUEST_ID_HEADER]) == 32


@pytest.mark.parametrize(
    ("body_id", "header_id", "reason"),
    [("body-id", "other-id", "REQUEST_ID_MISMATCH"), ("", "bad id!", "REQUEST_ID_INVALID")],
)
async def test_a_bad_or_conflicting_request_id_is_refused(
    echo_stack: LiveStack, body_id: str, header_id: str, reason: str
) -> None:
    code, trailing = await _raw_call(echo_stack, body_id, header_id)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    details = trailing["grpc-status-details-bin"]
    assert isinstance(details, bytes) and reason.encode() in details  # ErrorInfo.reason
    assert len(str(trailing[REQUEST_ID_HEADER])) == 32  # refused ids are not echoed; a fresh one is
    async with echo_stack.client() as client:
        with pytest.raises(InvalidRequestError) as err:
            await client.generate("hi", model="echo", request_id="bad id!")
    assert err.value.reason == "REQUEST_ID_INVALID" and err.value.field == "request_id"


async def test_errors_carry_the_request_id(echo_stack: LiveStack) -> None:
    async with AsyncClient(
        echo_stack.address, token=echo_stack.token("acme"), ca_cert=echo_stack.pki.ca_cert, tenant="globex"
    ) as client:  # acme's tester has no grant in globex
        with pytest.raises(PermissionDeniedError) as err:
            await client.generate("hi", request_id="denied-rid-3")
    assert err.value.request_id == "denied-rid-3"
    [record] = echo_stack.audit_records(request_id="denied-rid-3", event="authorization")
    assert record["decision"] == "deny" and record["tenant"] == "globex"


async def test_a_token_provider_is_called_again_before_its_token_expires(echo_stack: LiveStack) -> None:
    minted: list[str] = []

    async def provider() -> str:  # async providers are awaited; plain callables work the same
        minted.append(echo_stack.token("acme", ttl_seconds=4))
        return minted[-1]

    async with echo_stack.client("acme", token=provider, refresh_before=2.5) as client:
        started = time.monotonic()
        calls = 0
        while time.monotonic() - started < 4.0:  # outlives the first token
            assert (await client.generate("still me", model="echo")).text == "still me"
            calls += 1
            await asyncio.sleep(0.2)
    assert len(minted) >= 2, "the provider was never asked for a fresh token"
    assert calls > len(minted), "a valid cached token must be reused, not re-minted per call"


async def test_a_failing_token_provider_is_an_authentication_error(echo_stack: LiveStack) -> None:
    def provider() -> str:
        raise OSError("token file missing")

    async with echo_stack.client("acme", token=provider) as client:
        with pytest.raises(AuthenticationError) as err:
            await client.generate("hi", model="echo")
    assert err.value.reason == "TOKEN_PROVIDER_FAILED"
    assert isinstance(err.value.__cause__, OSError)


async def test_a_call_refused_before_output_is_retried_until_the_restarted_worker_answers(
    make_stack,  # type: ignore[no-untyped-def]
) -> None:
    live: LiveStack = make_stack()
    assert await live.health() == "SERVING"
    argv = live.kill_worker("globex", "echo")  # globex's only worker
    await _wait_health(live, "tenant/globex", "NOT_SERVING")
    assert await live.health() == "NOT_SERVING"  # every tenant needs a ready worker
    assert await live.health("tenant/acme") == "SERVING"  # the other tenant is unaffected

    # Backoff is random in [0, b) with b = 4, 8, 16, 16 s (gRPC's jitter): all four retries within
    # the worker's ~1 s restart is vanishingly unlikely, and each retry that fails is harmless.
    async with live.client("globex", retries=4, retry_backoff=(4.0, 16.0), timeout=90) as client:
        stream = client.stream("back again", model="echo", request_id="retry-rid-1")
        first = asyncio.ensure_future(stream.__anext__())
        await _wait_until(lambda: len(live.audit_records(request_id="retry-rid-1")) >= 1)
        live.restart_worker("globex", "echo", argv)
        chunks = [await first] + [c async for c in stream]
    assert "".join(c.text for c in chunks) == "back again"
    attempts = live.audit_records(request_id="retry-rid-1", event="authorization")
    assert len(attempts) >= 2, "the call was not retried"
    await _wait_health(live, "", "SERVING")


async def test_a_stream_that_produced_output_is_never_retried(make_stack) -> None:  # type: ignore[no-untyped-def]
    live: LiveStack = make_stack()
    async with live.client("acme", retries=4, retry_backoff=(0.1, 0.2)) as client:
        stream = client.stream(WORDS, model="slow", max_tokens=200, request_id="no-retry-rid")
        first = await stream.__anext__()
        live.kill_worker("acme", "slow")
        with pytest.raises(UnavailableError) as err:
            async for _ in stream:
                pass
    assert first.text and err.value.request_id == "no-retry-rid"
    await asyncio.sleep(1.0)  # any retry would have been made by now (backoff at most 0.2 s)
    assert len(live.audit_records(request_id="no-retry-rid", event="authorization")) == 1


def test_closing_a_sync_stream_aborts_generation(echo_stack: LiveStack) -> None:
    with Client(echo_stack.address, token=echo_stack.token(), ca_cert=echo_stack.pki.ca_cert) as client:
        stream = client.stream(WORDS, model="slow", max_tokens=200)
        got = [next(stream) for _ in range(3)]
        stream.close()  # type: ignore[attr-defined]
    assert len(got) == 3

    async def settled() -> tuple[int, int]:
        info = await echo_stack.worker_info("acme", "slow")
        return info.active, info.produced_tokens

    active, produced = asyncio.run(settled())
    deadline = time.monotonic() + 10
    while active and time.monotonic() < deadline:
        time.sleep(0.05)
        active, produced = asyncio.run(settled())
    time.sleep(0.5)
    assert asyncio.run(settled()) == (0, produced), "the engine kept generating after close()"


@pytest.mark.parametrize(
    ("case", "error", "reason"),
    [
        ("expired token", AuthenticationError, "TOKEN_EXPIRED"),
        ("tenant without a grant", PermissionDeniedError, "POLICY_DENIED"),
        ("max_tokens over the limit", InvalidRequestError, "INVALID_ARGUMENT"),
        ("message over the size limit", QuotaExceededError, None),
        ("deadline too short", DeadlineExceededError, "DEADLINE_EXCEEDED"),
    ],
)
async def test_every_error_type_comes_from_a_real_server_condition(
    echo_stack: LiveStack, case: str, error: type[Exception], reason: str | None
) -> None:
    options: dict[str, object] = {}
    call: dict[str, object] = {"model": "echo"}
    prompt = "hi"
    if case == "expired token":
        options["token"] = echo_stack.token(ttl_seconds=-600)
    elif case == "tenant without a grant":
        options["token"] = echo_stack.token("acme")
        options["tenant"] = "globex"
        call = {}
    elif case == "max_tokens over the limit":
        call["max_tokens"] = 100_000
    elif case == "message over the size limit":
        prompt = "x" * 100_000
    else:
        call = {"model": "slow", "max_tokens": 200, "timeout": 0.3}
        prompt = WORDS
    options.setdefault("token", echo_stack.token("acme"))
    async with AsyncClient(echo_stack.address, ca_cert=echo_stack.pki.ca_cert, **options) as client:  # type: ignore[arg-type]
        with pytest.raises(error) as err:
            await client.generate(prompt, **call)  # type: ignore[arg-type]
    assert type(err.value) is error
    if reason is not None:
        assert err.value.reason == reason  # type: ignore[attr-defined]
    assert err.value.request_id  # type: ignore[attr-defined]


async def _wait_health(live: LiveStack, service: str, status: str, limit: float = 15.0) -> None:
    end = time.monotonic() + limit
    while (now := await live.health(service)) != status:
        assert time.monotonic() < end, f"health of {service!r} stayed {now}, expected {status}"
        await asyncio.sleep(0.05)


async def _wait_until(predicate, limit: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    ("repeated", "code", "reason"),
    [
        (REQUEST_ID_HEADER, grpc.StatusCode.INVALID_ARGUMENT, "HEADER_REPEATED"),
        ("x-airlock-tenant", grpc.StatusCode.INVALID_ARGUMENT, "HEADER_REPEATED"),
        ("authorization", grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MALFORMED"),
    ],
)
async def test_metadata_sent_twice_is_refused_not_picked_from(
    echo_stack: LiveStack, repeated: str, code: grpc.StatusCode, reason: str
) -> None:
    """A proxy in front could read one copy and the gateway another: ambiguity is refused."""
    values = {
        REQUEST_ID_HEADER: ("rid-a", "rid-b"),
        "x-airlock-tenant": ("acme", "globex"),
        "authorization": (f"Bearer {echo_stack.token('acme')}", f"Bearer {echo_stack.token('globex')}"),
    }[repeated]
    metadata = [(repeated, v) for v in values]
    if repeated != "authorization":
        metadata.append(("authorization", f"Bearer {echo_stack.token('acme')}"))
    request = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="hi")], model="echo")
    channel = grpc.aio.secure_channel(
        echo_stack.address, grpc.ssl_channel_credentials(echo_stack.pki.ca_cert.read_bytes())
    )
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await inference_pb2_grpc.InferenceStub(channel).Generate(request, metadata=metadata, timeout=10)
    assert err.value.code() == code
    details = dict(err.value.trailing_metadata() or ())["grpc-status-details-bin"]
    assert isinstance(details, bytes) and reason.encode() in details
