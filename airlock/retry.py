"""The one "once more, after attesting the worker again" retry, for the SDK and the gateway alike.

A call sealed for a worker that has since restarted fails before anything was generated: the
worker lost the tenant keys the gateway released to it (`KEYS_MISSING`, gateway-sealed) or the key
an end-to-end client sealed to (`ATTESTATION_STALE`). Attesting it again makes a second attempt
worth making, and it is safe: nothing came back. A stream is retried only up to its first message.
Everything else (`UNAVAILABLE` before any answer) is gRPC's own retry policy's business.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from airlock.errors import AirlockError
from airlock.rpcstatus import from_rpc_error

__all__ = ["first_message", "once_more", "rest_of"]

T = TypeVar("T")


async def once_more(
    attempt: Callable[[], Awaitable[T]], recover: Callable[[AirlockError], Awaitable[bool]]
) -> T:
    """`attempt()`, and when it fails with a gRPC error that `recover` repaired (it returns True
    when a second attempt can succeed), `attempt()` once more. A failure `recover` declines, or a
    second one, propagates as the `grpc.aio.AioRpcError` it is: each caller translates it its way."""
    try:
        return await attempt()
    except grpc.aio.AioRpcError as exc:
        if not await recover(from_rpc_error(exc)):
            raise
    return await attempt()


async def first_message(call: Any) -> Any:
    """The first message of a server-streaming call (`grpc.aio.EOF` when it ended without one), so
    a stream that fails before it started can be retried; a failed read cancels the call."""
    try:
        return await call.read()
    except BaseException:
        call.cancel()
        raise


async def rest_of(first: Any, call: Any) -> AsyncIterator[Any]:
    """The first message already read, then the rest of the call. `read()`, not iteration: gRPC
    refuses to mix the two on one call."""
    message = first
    while message is not grpc.aio.EOF:
        yield message
        message = await call.read()
