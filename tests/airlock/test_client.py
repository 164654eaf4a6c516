"""The SDK's moving parts without a server: token refresh, the retry policy, option checks, error mapping."""

from __future__ import annotations

import inspect
import json
import time

import grpc
import jwt
import pytest

from airlock import AsyncClient, AuthenticationError, Client, UnavailableError
from airlock.client import _error, _service_config, _Token
from airlock.connection import Connection

NOWHERE = Connection("127.0.0.1:1", None, client_cert=False)


def _jwt(exp_in: float) -> str:
    # Only the SDK's unverified `exp` read matters here; the gateway verifies real tokens.
    return jwt.encode({"exp": int(time.time() + exp_in), "n": time.perf_counter_ns()}, "k" * 32)


async def test_a_fixed_token_is_sent_as_is() -> None:
    assert await _Token("abc", 60).get() == "abc"
    assert await _Token(None, 60).get() is None


async def test_a_provider_token_is_reused_until_it_nears_expiry() -> None:
    calls: list[str] = []

    def provider() -> str:
        calls.append(_jwt(600))
        return calls[-1]

    token = _Token(provider, refresh_before=60)
    assert await token.get() == await token.get() == calls[0]
    assert len(calls) == 1


async def test_a_token_inside_the_refresh_window_is_replaced() -> None:
    calls: list[str] = []

    async def provider() -> str:
        calls.append(_jwt(30))  # expires in 30 s, refresh 60 s before: always stale
        return calls[-1]

    token = _Token(provider, refresh_before=60)
    first, second = await token.get(), await token.get()
    assert len(calls) == 2 and first != second


async def test_an_opaque_token_is_asked_for_on_every_call() -> None:
    calls = 0

    def provider() -> str:
        nonlocal calls
        calls += 1
        return f"opaque-{calls}"

    token = _Token(provider, refresh_before=60)
    assert [await token.get() for _ in range(3)] == ["opaque-1", "opaque-2", "opaque-3"]


@pytest.mark.parametrize("bad", [lambda: "", lambda: None, lambda: 1 / 0])
async def test_a_provider_that_fails_or_returns_nothing_is_an_authentication_error(bad: object) -> None:
    with pytest.raises(AuthenticationError) as err:
        await _Token(bad, 60).get()  # type: ignore[arg-type]
    assert err.value.reason == "TOKEN_PROVIDER_FAILED"


def test_the_retry_policy_retries_only_unavailable() -> None:
    [config] = json.loads(_service_config(3, (0.2, 2.0)))["methodConfig"]
    assert config["name"] == [{"service": "airlock.v1.Inference"}]
    assert config["retryPolicy"] == {
        "maxAttempts": 4, "initialBackoff": "0.200s", "maxBackoff": "2.000s",
        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"],
    }  # fmt: skip
    [off] = json.loads(_service_config(0, (0.2, 2.0)))["methodConfig"]
    assert "retryPolicy" not in off


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"client_cert": b"x"}, "go together"),
        ({"retries": 5}, "retries"),
        ({"retry_backoff": (2.0, 1.0)}, "retry_backoff"),
        ({"keepalive_seconds": 1}, "keepalive_seconds"),
    ],
)
def test_bad_options_are_refused_up_front(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AsyncClient("127.0.0.1:1", **options)  # type: ignore[arg-type]


def test_a_call_the_server_cancelled_is_unavailable_to_the_caller() -> None:
    # gRPC core cancels calls a stopping server received but never started; the caller didn't
    # cancel (its own cancellation raises asyncio.CancelledError), so it gets the retryable status.
    trailing = grpc.aio.Metadata(("x-request-id", "req-7"))
    exc = grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), trailing, details="Cancelled")
    err = _error(exc, "req-7", NOWHERE)
    assert isinstance(err, UnavailableError)
    assert (err.reason, err.request_id) == ("SERVER_CANCELLED", "req-7")
    other = _error(
        grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), trailing), "x", NOWHERE
    )
    assert isinstance(other, UnavailableError) and other.reason != "SERVER_CANCELLED"


# --- generate/stream: one typed, keyword-only signature, on both clients -------------------------

PARAMETERS = ["model", "max_tokens", "temperature", "top_p", "seed", "stop", "request_id", "timeout"]


@pytest.mark.parametrize("method", ["generate", "stream"])
def test_generate_and_stream_take_the_prompt_then_named_keywords_only(method: str) -> None:
    for cls in (AsyncClient, Client):
        signature = inspect.signature(getattr(cls, method))
        prompt, *rest = list(signature.parameters.values())[1:]  # after self
        assert prompt.name == "prompt" and prompt.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        assert [p.name for p in rest] == PARAMETERS
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is None for p in rest)


async def test_a_misspelled_parameter_is_a_type_error_not_ignored() -> None:
    async with AsyncClient("127.0.0.1:9") as client:  # never dialled: the call is refused first
        with pytest.raises(TypeError, match="max_token"):
            await client.generate("hi", max_token=5)  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="max_token"):
            client.stream("hi", max_token=5)  # type: ignore[call-arg]
        with pytest.raises(TypeError):
            await client.generate("hi", "echo")  # type: ignore[misc]


def test_the_blocking_client_refuses_a_misspelled_parameter_at_the_call() -> None:
    with Client("127.0.0.1:9") as client:
        with pytest.raises(TypeError, match="max_token"):
            client.generate("hi", max_token=5)  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="max_token"):
            client.stream("hi", max_token=5)  # type: ignore[call-arg]  # not at the first chunk
        with pytest.raises(TypeError, match="timeout_s"):
            client.list_models(timeout_s=3)  # type: ignore[call-arg]
