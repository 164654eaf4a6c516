"""The client SDK: `AsyncClient` (asyncio) and `Client`, a thin synchronous adapter over it.

    async with AsyncClient("gateway:7443", token=token, ca_cert="ca.crt") as client:
        answer = await client.generate("Hello")
        async for chunk in client.stream("Tell me a story"):
            print(chunk.text, end="")

Failed calls raise the typed errors of `airlock.errors`. Leaving a stream early cancels the call,
which stops generation on the server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import inspect
import json
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import grpc

from airlock.attestation import AttestationPolicy, Verified
from airlock.connection import Connection
from airlock.e2e import EndToEnd
from airlock.envelope import Opener
from airlock.errors import AirlockError, AuthenticationError, CancelledError, UnavailableError
from airlock.retry import first_message, once_more, rest_of
from airlock.rpcstatus import from_rpc_error
from airlock.types import FINISH_REASONS, REQUEST_ID_HEADER, Chunk, Completion, Message, new_request_id
from airlock.v1 import inference_pb2 as pb
from airlock.v1 import inference_pb2_grpc

__all__ = ["REQUEST_ID_HEADER", "TENANT_HEADER", "AsyncClient", "Client", "TokenSource"]

TENANT_HEADER = "x-airlock-tenant"  # act in this tenant instead of the identity's own

# A fixed token, or a provider (plain or async) called for a fresh one when the last is near expiry.
TokenSource = str | Callable[[], str | Awaitable[str]] | None
Prompt = str | Sequence[Message] | Sequence[tuple[str, str]]
T = TypeVar("T")
P = ParamSpec("P")

_SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name


def _read(value: bytes | str | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).expanduser().read_bytes()


def _request(
    prompt: Prompt,
    model: str | None,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
    stop: Sequence[str] | None,
    request_id: str | None,
) -> pb.GenerateRequest:
    if isinstance(prompt, str):
        messages = [pb.ChatMessage(role="user", content=prompt)]
    else:
        messages = []
        for m in prompt:
            role, content = (m.role, m.content) if isinstance(m, Message) else m
            messages.append(pb.ChatMessage(role=role, content=content))
    params = pb.SamplingParams(stop=list(stop or ()))
    if max_tokens is not None:
        params.max_tokens = max_tokens
    if temperature is not None:
        params.temperature = temperature
    if top_p is not None:
        params.top_p = top_p
    if seed is not None:
        params.seed = seed
    return pb.GenerateRequest(
        request_id=request_id or new_request_id(), model=model or "", messages=messages, params=params
    )


def _claims(token: str) -> dict[str, Any]:
    """A JWT's claims, read without verification: only to schedule the refresh and to know the tenant
    the caller acts in; the gateway verifies."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return {}
    return claims if isinstance(claims, dict) else {}


def _expiry(token: str) -> float | None:
    exp = _claims(token).get("exp")
    return float(exp) if isinstance(exp, int | float) else None


class _Token:
    """Caches the provider's token and asks for a new one `refresh_before` seconds before it expires,
    so a call never goes out with a token about to lapse. Opaque tokens (no readable `exp`) are asked
    for on every call."""

    def __init__(self, source: TokenSource, refresh_before: float) -> None:
        self.source = source
        self.refresh_before = refresh_before
        self._value: str | None = source if isinstance(source, str) else None
        self._expires: float | None = None
        self._lock = asyncio.Lock()

    def _fresh(self) -> bool:
        if self._value is None or self._expires is None:
            return False
        return time.time() < self._expires - self.refresh_before

    async def get(self) -> str | None:
        if not callable(self.source) or self._fresh():
            return self._value
        async with self._lock:  # one refresh for all the calls that found the token stale
            if not self._fresh():
                try:
                    value = self.source()
                    token = await value if inspect.isawaitable(value) else value
                except Exception as exc:
                    raise AuthenticationError(
                        "the token provider failed", reason="TOKEN_PROVIDER_FAILED"
                    ) from exc
                if not isinstance(token, str) or not token:
                    raise AuthenticationError(
                        "the token provider returned no token", reason="TOKEN_PROVIDER_FAILED"
                    )
                self._value, self._expires = token, _expiry(token)
        return self._value


def _service_config(retries: int, backoff: tuple[float, float]) -> str:
    """gRPC retries `UNAVAILABLE` by itself, with exponential backoff and jitter, and only while
    nothing has come back yet: a stream that produced a token is never retried (that would repeat
    output), a call refused before the first token is."""
    config: dict[str, Any] = {"name": [{"service": _SERVICE}]}
    if retries > 0:
        config["retryPolicy"] = {
            "maxAttempts": min(retries + 1, 5),  # gRPC's own cap
            "initialBackoff": f"{backoff[0]:.3f}s",
            "maxBackoff": f"{backoff[1]:.3f}s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    return json.dumps({"methodConfig": [config]})


class AsyncClient:
    """Talks to an Airlock gateway over TLS: a bearer token for users, a client certificate for services."""

    def __init__(
        self,
        target: str,
        *,
        token: TokenSource = None,
        ca_cert: bytes | str | Path | None = None,
        client_cert: bytes | str | Path | None = None,
        client_key: bytes | str | Path | None = None,
        tenant: str | None = None,
        timeout: float | None = 120.0,
        retries: int = 3,
        retry_backoff: tuple[float, float] = (0.2, 2.0),
        refresh_before: float = 60.0,
        keepalive_seconds: float | None = 30.0,
        max_message_bytes: int = 4 << 20,
        end_to_end: AttestationPolicy | None = None,
        worker_ca: bytes | str | Path | None = None,
    ) -> None:
        """`token`: a string, or a callable (plain or async) returning a fresh one; it is called again
        `refresh_before` seconds before the last token's `exp`. `client_cert` and `client_key` instead
        for services (mTLS, on the gateway's service port). `tenant` acts in another tenant than the
        identity's own, which the policy must grant explicitly. `timeout` is each call's default
        deadline in seconds (retries included). `retries`: how many times a call refused with
        UNAVAILABLE before any output is tried again (0 to 4), backoff from `retry_backoff[0]` doubling
        up to `retry_backoff[1]` seconds, with jitter. `keepalive_seconds`: ping interval while calls
        are open (None: no pings; the gateway refuses pings more often than every 10 s).
        `end_to_end`: seal prompts to the worker's attested key, which this client verifies against
        the policy given and `worker_ca`, the CA of worker attestation certificates (never the TLS
        CA); the gateway then can't open prompts or answers (docs/sealing.md)."""
        if (client_cert is None) != (client_key is None):
            raise ValueError("client_cert and client_key go together")
        if not 0 <= retries <= 4:
            raise ValueError("retries must be between 0 and 4")
        if not 0 < retry_backoff[0] <= retry_backoff[1]:
            raise ValueError("retry_backoff is (initial, maximum) seconds, 0 < initial <= maximum")
        if keepalive_seconds is not None and keepalive_seconds < 10:
            raise ValueError("keepalive_seconds must be at least 10 (the gateway refuses faster pings)")
        if end_to_end is not None and worker_ca is None:  # never the TLS CA: see docs/sealing.md
            raise ValueError("end_to_end needs worker_ca: the CA of worker attestation certificates")
        self._token = _Token(token, refresh_before)
        self._tenant = tenant
        ca_name = None if ca_cert is None else "" if isinstance(ca_cert, bytes) else str(ca_cert)
        self._connection = Connection(target, ca_name, client_cert is not None)
        self._timeout = timeout
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(ca_cert),
            private_key=_read(client_key),
            certificate_chain=_read(client_cert),
        )
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", _service_config(retries, retry_backoff)),
        ]
        if keepalive_seconds is not None:
            options += [
                ("grpc.keepalive_time_ms", int(keepalive_seconds * 1000)),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 0),
            ]
        self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._e2e: EndToEnd | None = None
        if end_to_end is not None:
            ca = _read(worker_ca)
            assert ca is not None
            self._e2e = EndToEnd(self._fetch_attestation, ca_pem=ca, policy=end_to_end)

    async def _metadata(self, request_id: str) -> tuple[tuple[str, str], ...]:
        metadata: tuple[tuple[str, str], ...] = ((REQUEST_ID_HEADER, request_id),)
        if token := await self._token.get():
            metadata += (("authorization", f"Bearer {token}"),)
        if self._tenant:
            metadata += ((TENANT_HEADER, self._tenant),)
        return metadata

    async def generate(
        self,
        prompt: Prompt,
        *,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Completion:
        """Generate a whole answer.

        `model`: the tenant's default when None. `max_tokens`, `temperature`, `top_p`, `seed`,
        `stop`: sampling, the gateway's defaults when None. `request_id`: generated when None; it
        comes back on the answer and on any error as `.request_id`. `timeout`: seconds, this
        client's default when None.
        """
        plain = _request(prompt, model, max_tokens, temperature, top_p, seed, stop, request_id)

        async def attempt() -> tuple[pb.GenerateResponse, Opener | None]:
            request, opener = await self._sealed(plain)
            reply = await self._stub.Generate(
                request, timeout=timeout or self._timeout, metadata=await self._metadata(request.request_id)
            )
            return reply, opener

        try:
            reply, opener = await once_more(attempt, self._stale(plain.model))
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, plain.request_id, self._connection) from None
        text = reply.text
        if opener is not None:
            text = opener.open(reply.sealed_text).decode()
            opener.finish()
        return Completion(
            request_id=reply.request_id,
            model=reply.model,
            text=text,
            finish_reason=FINISH_REASONS.get(reply.finish_reason, "unknown"),
            prompt_tokens=reply.usage.prompt_tokens,
            completion_tokens=reply.usage.completion_tokens,
        )

    async def stream(
        self,
        prompt: Prompt,
        *,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> AsyncGenerator[Chunk, None]:
        """Stream the answer chunk by chunk (the arguments are `generate`'s); leaving the loop early
        (or `aclose()`) cancels the call, which stops generation on the server. Retried only until
        the first chunk arrives."""
        plain = _request(prompt, model, max_tokens, temperature, top_p, seed, stop, request_id)

        async def start() -> tuple[Any, Any, Opener | None]:
            request, opener = await self._sealed(plain)
            call = self._stub.GenerateStream(
                request, timeout=timeout or self._timeout, metadata=await self._metadata(request.request_id)
            )
            return call, await first_message(call), opener

        call: Any = None
        try:
            call, first, opener = await once_more(start, self._stale(plain.model))
            async for c in rest_of(first, call):
                finished = c.finish_reason != pb.FINISH_REASON_UNSPECIFIED
                yield Chunk(
                    request_id=c.request_id,
                    text=opener.open(c.sealed_text).decode() if opener is not None else c.text,
                    tokens=c.tokens,
                    finish_reason=FINISH_REASONS.get(c.finish_reason) if finished else None,
                    prompt_tokens=c.usage.prompt_tokens,
                    completion_tokens=c.usage.completion_tokens,
                )
            if opener is not None:
                opener.finish()
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, plain.request_id, self._connection) from None
        finally:
            if call is not None:
                call.cancel()

    async def _sealed(self, plain: pb.GenerateRequest) -> tuple[pb.GenerateRequest, Opener | None]:
        if self._e2e is None:
            return plain, None
        await self._token.get()  # the tenant it acts in may come from the token
        return await self._e2e.seal(plain, self._expected_tenant())

    def _stale(self, model: str) -> Callable[[AirlockError], Awaitable[bool]]:
        """Whether a failed call goes once more: end to end, when the worker we sealed to is gone
        (restarted, with a new key), after forgetting its attestation (the next seal attests again)."""

        async def recover(err: AirlockError) -> bool:
            if self._e2e is None or err.reason != "ATTESTATION_STALE":
                return False
            self._e2e.forget(model)
            return True

        return recover

    def _expected_tenant(self) -> str:
        """The tenant whose worker must attest: the one this client acts in."""
        token = self._token._value
        claims = _claims(token) if token else {}
        tenant = self._tenant or claims.get("tenant")
        if not isinstance(tenant, str) or not tenant:
            raise ValueError("end-to-end mode with a client certificate needs tenant= (the service's own)")
        return tenant

    async def _fetch_attestation(self, model: str, nonce: bytes) -> pb.Attestation:
        request_id = new_request_id()
        try:
            reply: pb.Attestation = await self._stub.GetAttestation(
                pb.AttestationRequest(model=model, nonce=nonce),
                timeout=self._timeout,
                metadata=await self._metadata(request_id),
            )
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, request_id, self._connection) from None
        return reply

    async def attestation(self, model: str = "") -> Verified:
        """Fresh evidence of what the worker serving `model` runs, verified against this client's
        `end_to_end` policy (AttestationError when it falls short)."""
        if self._e2e is None:
            raise ValueError("attestation() checks evidence against end_to_end=AttestationPolicy(...)")
        await self._token.get()
        return await self._e2e.attest(model, self._expected_tenant())

    async def list_models(self, *, timeout: float | None = None) -> list[str]:
        """The names of the models this caller may use, the tenant's default first."""
        request_id = new_request_id()
        try:
            reply = await self._stub.ListModels(
                pb.ListModelsRequest(),
                timeout=timeout or self._timeout,
                metadata=await self._metadata(request_id),
            )
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, request_id, self._connection) from None
        return [m.name for m in reply.models]

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _error(exc: grpc.aio.AioRpcError, request_id: str, connection: Connection) -> AirlockError:
    err = from_rpc_error(exc)
    if isinstance(err, UnavailableError) and err.reason == "UNAVAILABLE":
        # gRPC's own: no connection. Say which mistake it was, once, here.
        explained = connection.explain(exc.details() or "")
        if explained is not None:
            explained.request_id, err = err.request_id, explained
    if isinstance(err, CancelledError):
        # Never our own cancellation (that raises asyncio.CancelledError here): the server gave up
        # the call, as gRPC does to calls a gateway had received but not started when it began
        # to shut down. For this caller it means "try again", like any other UNAVAILABLE.
        replaced = UnavailableError(
            "the server cancelled the call (it may be shutting down); retry", reason="SERVER_CANCELLED"
        )
        replaced.request_id, err = err.request_id, replaced
    err.request_id = err.request_id or request_id
    return err


def _blocking(
    method: Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[Client, P], T]:
    """`Client`'s version of an `AsyncClient` method: the same arguments (a wrong one is a TypeError
    at the call), run on the client's loop and waited for."""

    @functools.wraps(method)
    def run(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        result: T = self._call(method(self._async, *args, **kwargs))
        return result

    run.__qualname__ = f"Client.{method.__name__}"
    return run


def _iterating(
    method: Callable[Concatenate[AsyncClient, P], AsyncGenerator[T, None]],
) -> Callable[Concatenate[Client, P], Iterator[T]]:
    """`Client`'s version of an `AsyncClient` stream: the same arguments, checked at the call (not
    at the first chunk), and an iterator whose items are awaited on the client's loop."""

    @functools.wraps(method)
    def run(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
        return self._iterate(method(self._async, *args, **kwargs))

    run.__qualname__ = f"Client.{method.__name__}"
    return run


class Client:
    """Blocking client: runs an `AsyncClient` on a private event-loop thread and waits for it."""

    def __init__(self, target: str, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="airlock-client", daemon=True)
        self._thread.start()
        self._async: AsyncClient = self._call(self._make(target, options))

    @staticmethod
    async def _make(target: str, options: dict[str, Any]) -> AsyncClient:
        return AsyncClient(target, **options)  # the channel binds to the loop it is made on

    def _call(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result()

    def _iterate(self, agen: AsyncGenerator[T, None]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self._call(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._call(agen.aclose())

    generate = _blocking(AsyncClient.generate)
    stream = _iterating(AsyncClient.stream)  # close() the iterator, or leave its loop, to cancel
    attestation = _blocking(AsyncClient.attestation)
    list_models = _blocking(AsyncClient.list_models)

    def close(self) -> None:
        if self._loop.is_running():
            self._call(self._async.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
