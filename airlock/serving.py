"""What every Airlock gRPC server shares: the server factory, error mapping and call guards.

`new_server` gives a `grpc.aio` server with message limits, health and reflection. `ErrorInterceptor`
maps the Airlock error tree to statuses (most specific class first) and hides everything else behind
`INTERNAL` with the request id. `GuardInterceptor` runs a check before every method but health
checks, so a refused call never reaches servicer code.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from airlock.errors import AirlockError
from airlock.rpcstatus import to_status

__all__ = [
    "ErrorInterceptor",
    "GuardInterceptor",
    "abort_with",
    "guard_handler",
    "new_server",
    "wrap_handler",
]

Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]
HEALTH_PREFIX = "/grpc.health.v1.Health/"
_log = logging.getLogger("airlock.rpc")


def new_server(
    interceptors: Sequence[grpc.aio.ServerInterceptor],
    services: Sequence[str],
    *,
    max_message_bytes: int,
    max_metadata_bytes: int = 64 << 10,
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A server with message limits, the health service and reflection for `services`.

    gRPC's default header limit (8 KiB, enforced at random above it) would refuse large tokens
    before our own size check could give them a stable reason, an audit record and a lockout
    count; headers get room up to `max_metadata_bytes` and the checks behind it decide."""
    server = grpc.aio.server(
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_metadata_size", max_metadata_bytes),
            ("grpc.absolute_max_metadata_size", max_metadata_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection((*services, health_name, reflection.SERVICE_NAME), server)
    return server, health_servicer


def bind(server: grpc.aio.Server, listen: str, credentials: grpc.ServerCredentials) -> int:
    """Bind a TLS port (there are no plaintext ones); return the port actually bound."""
    port: int = server.add_secure_port(listen, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    return port


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    unary: Callable[[Behavior], Behavior],
    stream: Callable[[Behavior], Behavior],
) -> grpc.RpcMethodHandler:
    """Return `handler` with its behaviour wrapped: `unary` for single responses, `stream` for
    streamed ones (whatever the request side). An unknown handler shape is refused, never passed."""
    kinds = (
        ("unary_unary", unary, grpc.unary_unary_rpc_method_handler),
        ("stream_unary", unary, grpc.stream_unary_rpc_method_handler),
        ("unary_stream", stream, grpc.unary_stream_rpc_method_handler),
        ("stream_stream", stream, grpc.stream_stream_rpc_method_handler),
    )
    for attr, wrap, make in kinds:
        behavior = getattr(handler, attr)
        if behavior is not None:
            return make(
                wrap(behavior),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    raise TypeError("unsupported RPC handler shape")


Check = Callable[[str, Any, grpc.aio.ServicerContext], None]


def guard_handler(handler: grpc.RpcMethodHandler, method: str, check: Check) -> grpc.RpcMethodHandler:
    """Return `handler` with `check(method, request, context)` run first; `check` refuses by raising.

    For client-streaming methods `request` is the request iterator, not a message."""

    def unary(behavior: Behavior) -> Behavior:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            check(method, request, context)
            return await behavior(request, context)

        return run

    def stream(behavior: Behavior) -> Behavior:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            check(method, request, context)
            async for item in behavior(request, context):
                yield item

        return run

    return wrap_handler(handler, unary, stream)


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """Runs `check` before every method except health checks; `check` raises to refuse the call."""

    def check(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        raise NotImplementedError

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler
        return guard_handler(handler, method, self.check)


async def abort_with(context: grpc.aio.ServicerContext, err: AirlockError, request_id: str) -> None:
    status = to_status(err, request_id=request_id)
    await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)


async def _abort_for(context: grpc.aio.ServicerContext, exc: Exception, request: Any) -> None:
    inner = getattr(request, "request", request)
    request_id = str(getattr(inner, "request_id", "") or "")
    if isinstance(exc, AirlockError):
        await abort_with(context, exc, request_id)
        return
    # The details go to the log, never to the caller; the request id ties the two together.
    _log.error(
        "internal error", exc_info=exc, extra={"request_id": request_id, "error_type": type(exc).__name__}
    )
    await abort_with(
        context, AirlockError(f"internal error (request id {request_id or 'unknown'})"), request_id
    )


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps the Airlock error tree to gRPC statuses, most specific class first; hides the rest."""

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return wrap_handler(handler, _map_unary, _map_stream)


def _map_unary(behavior: Behavior) -> Behavior:
    async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort_for(context, exc, request)

    return run


def _map_stream(behavior: Behavior) -> Behavior:
    async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in behavior(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort_for(context, exc, request)

    return run
