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
import threading
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import grpc

from airlock.rpcstatus import from_rpc_error
from airlock.types import FINISH_REASONS, Chunk, Completion, Message
from airlock.v1 import inference_pb2 as pb
from airlock.v1 import inference_pb2_grpc

__all__ = ["TENANT_HEADER", "AsyncClient", "Client"]

TENANT_HEADER = "x-airlock-tenant"  # act in this tenant instead of the identity's own

TokenSource = str | Callable[[], str] | None
Prompt = str | Sequence[Message] | Sequence[tuple[str, str]]
T = TypeVar("T")


def _read(value: bytes | str | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def _messages(prompt: Prompt) -> list[pb.ChatMessage]:
    if isinstance(prompt, str):
        return [pb.ChatMessage(role="user", content=prompt)]
    out = []
    for m in prompt:
        role, content = (m.role, m.content) if isinstance(m, Message) else m
        out.append(pb.ChatMessage(role=role, content=content))
    return out


class AsyncClient:
    """Talks to an Airlock gateway over TLS with a bearer token (a string or a callable)."""

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
        max_message_bytes: int = 4 << 20,
    ) -> None:
        """`token` for users (a string, or a callable returning a fresh one); `client_cert` and
        `client_key` for services (mTLS, on the gateway's service port). `tenant` acts in another
        tenant than the identity's own, which the policy must grant explicitly."""
        if (client_cert is None) != (client_key is None):
            raise ValueError("client_cert and client_key go together")
        self._token = token
        self._tenant = tenant
        self._timeout = timeout
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(ca_cert),
            private_key=_read(client_key),
            certificate_chain=_read(client_cert),
        )
        self._channel = grpc.aio.secure_channel(
            target,
            credentials,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
        )
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        token = self._token() if callable(self._token) else self._token
        metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        if self._tenant:
            metadata += ((TENANT_HEADER, self._tenant),)
        return metadata

    @staticmethod
    def _request(
        prompt: Prompt,
        *,
        model: str = "",
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        request_id: str = "",
    ) -> pb.GenerateRequest:
        params = pb.SamplingParams(stop=list(stop))
        if max_tokens is not None:
            params.max_tokens = max_tokens
        if temperature is not None:
            params.temperature = temperature
        if top_p is not None:
            params.top_p = top_p
        if seed is not None:
            params.seed = seed
        return pb.GenerateRequest(
            request_id=request_id, model=model, messages=_messages(prompt), params=params
        )

    async def generate(self, prompt: Prompt, *, timeout: float | None = None, **params: Any) -> Completion:
        """Generate a whole answer.

        `params`: model, max_tokens, temperature, top_p, seed, stop, request_id.
        """
        try:
            reply = await self._stub.Generate(
                self._request(prompt, **params),
                timeout=timeout or self._timeout,
                metadata=self._metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return Completion(
            request_id=reply.request_id,
            model=reply.model,
            text=reply.text,
            finish_reason=FINISH_REASONS.get(reply.finish_reason, "unknown"),
            prompt_tokens=reply.usage.prompt_tokens,
            completion_tokens=reply.usage.completion_tokens,
        )

    async def stream(
        self, prompt: Prompt, *, timeout: float | None = None, **params: Any
    ) -> AsyncGenerator[Chunk, None]:
        """Stream the answer chunk by chunk; leaving the loop early cancels the call."""
        call = self._stub.GenerateStream(
            self._request(prompt, **params),
            timeout=timeout or self._timeout,
            metadata=self._metadata(),
        )
        try:
            async for c in call:
                finished = c.finish_reason != pb.FINISH_REASON_UNSPECIFIED
                yield Chunk(
                    request_id=c.request_id,
                    text=c.text,
                    tokens=c.tokens,
                    finish_reason=FINISH_REASONS.get(c.finish_reason) if finished else None,
                    prompt_tokens=c.usage.prompt_tokens,
                    completion_tokens=c.usage.completion_tokens,
                )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def list_models(self, *, timeout: float | None = None) -> list[str]:
        try:
            reply = await self._stub.ListModels(
                pb.ListModelsRequest(), timeout=timeout or self._timeout, metadata=self._metadata()
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return [m.name for m in reply.models]

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


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

    def generate(self, prompt: Prompt, **params: Any) -> Completion:
        result: Completion = self._call(self._async.generate(prompt, **params))
        return result

    def stream(self, prompt: Prompt, **params: Any) -> Iterator[Chunk]:
        """An iterator of chunks; `close()` it (or leave a `for` loop early) to cancel the call."""
        agen = self._async.stream(prompt, **params)
        try:
            while True:
                try:
                    yield self._call(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._call(agen.aclose())

    def list_models(self, **options: Any) -> list[str]:
        result: list[str] = self._call(self._async.list_models(**options))
        return result

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
