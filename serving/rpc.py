"""What every Airlock gRPC server shares: the server factory, error mapping and call guards.

`new_server` gives a `grpc.aio` server with message limits, keepalive rules, health and reflection;
reflection describes the server's own services only (never another `.proto` the process imported),
and health's `List` answers UNIMPLEMENTED (`Health`).
`ErrorInterceptor` gives every call its request id (from `x-request-id` metadata, the request body,
or a new one; echoed in trailing metadata and bound to every log line of the call), runs the
server's `Guard` check (a refused call never reaches servicer code), maps the Airlock error tree to
statuses (most specific class first) and hides everything else behind `INTERNAL` with the request id.
Request bytes that are not a valid message are refused with `INVALID_ARGUMENT` (`MALFORMED_REQUEST`)
before anything else runs, where gRPC alone would answer `UNKNOWN`; health checks get only that
refusal. It is one interceptor, and each method's wrapped handler is built once,
because every layer and every per-call handler object is paid on every request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from airlock.errors import AirlockError, CancelledError, InvalidRequestError
from airlock.rpcstatus import to_status
from airlock.types import REQUEST_ID_HEADER, check_request_id, new_request_id
from serving.logs import bind_request_id

__all__ = [
    "OWN_CONNECTION",
    "ErrorInterceptor",
    "Guard",
    "Health",
    "abort_with",
    "caller_error",
    "header_value",
    "logged_error",
    "new_server",
    "reflection_pool",
    "request_id_of",
    "wrap_handler",
]

Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]
HEALTH_PREFIX = "/grpc.health.v1.Health/"
_log = logging.getLogger("airlock.rpc")

# A client channel argument: the channel gets a connection of its own instead of gRPC's subchannel
# shared per target in the process, which after a refusal keeps backing off and would fail a later
# call to a server now listening on that target without trying it (admin sockets of restarted or
# late processes).
OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)

# Clients may ping an idle connection every 10 s at most (the SDK pings every 30 s); faster pings
# count as strikes and two strikes close the connection, so a misbehaving client can't keep the
# server busy answering pings. The server pings quiet connections itself to find dead peers.
KEEPALIVE_OPTIONS = (
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 2),
)

# Bounds on connections that hold resources without using them (slowloris): a connection must
# finish its TLS handshake within 10 s (gRPC's default is 120 s, so a few thousand silent sockets
# could pin file descriptors and handshake state for two minutes); a connection with no call open
# for 10 minutes is closed (clients reconnect transparently); one connection multiplexes at most
# 256 streams (more wait in the client, they are not refused). Calls per tenant are bounded
# separately by the quota's concurrent_streams.
CONNECTION_LIMIT_OPTIONS = (
    ("grpc.server_handshake_timeout_ms", 10_000),
    ("grpc.max_connection_idle_ms", 600_000),
    ("grpc.max_concurrent_streams", 256),
)


class Health(health.aio.HealthServicer):
    """gRPC's health servicer, with `List` refused cleanly: it would name every service the server
    reports on (gRPC's own leaves it to a NotImplementedError and a traceback in the log)."""

    async def List(self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Health/List is not served")


def reflection_pool(services: Sequence[str]) -> descriptor_pool.DescriptorPool:
    """A descriptor pool holding only the files that define `services` and what they import.

    Reflection over the process's default pool would describe every `.proto` the process ever
    imported (the gateway's internal worker API among them) to anyone who asks."""
    default, pool, added = descriptor_pool.Default(), descriptor_pool.DescriptorPool(), set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
        added.add(file.name)

    for name in services:
        add(default.FindServiceByName(name).file)
    return pool


def new_server(
    interceptors: Sequence[grpc.aio.ServerInterceptor],
    services: Sequence[str],
    *,
    max_message_bytes: int,
    max_metadata_bytes: int = 64 << 10,
    health_servicer: Health | None = None,
    reuse_port: bool = False,
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A server with message limits, the health service (`health_servicer`, or a plain `Health`)
    and reflection for `services`. Its ports are its own unless `reuse_port` (SO_REUSEPORT: the
    processes of one gateway, all of its user, share them; the kernel spreads connections).

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
            ("grpc.so_reuseport", int(reuse_port)),
            *KEEPALIVE_OPTIONS,
            *CONNECTION_LIMIT_OPTIONS,
        ],
    )
    health_servicer = health_servicer or Health()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    described = (*services, health_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(described, server, pool=reflection_pool(described))
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


class Guard(Protocol):
    """Decides whether a call may run; refuses by raising an `AirlockError`.

    For client-streaming methods `request` is the request iterator, not a message. What `check`
    returns, when not None, is awaited before the servicer runs (the gateway's write-ahead audit
    record of the decision, written with others in one group)."""

    def check(
        self, method: str, request: Any, context: grpc.aio.ServicerContext
    ) -> Awaitable[None] | None: ...


def header_value(metadata: Any, name: str) -> str | None:
    """The value of call metadata `name`, None when absent. Sent more than once it is ambiguous (a
    proxy and the server could each read another one), so it is refused, never picked from."""
    found: str | None = None
    for key, value in metadata or ():
        if key == name:
            if found is not None:
                raise InvalidRequestError(f"metadata {name!r} sent more than once", reason="HEADER_REPEATED")
            found = str(value)
    return found


def request_id_of(request: Any, context: grpc.aio.ServicerContext) -> str:
    """The call's request id: the `x-request-id` header, else the body's `request_id` (a worker
    request's inner one), else a new one. Checked here, once per call; the body is only read. A
    malformed id, or a header and body that disagree, is refused."""
    header = header_value(context.invocation_metadata(), REQUEST_ID_HEADER) or ""
    inner = getattr(request, "request", request)
    body = getattr(inner, "request_id", None)
    body = body if isinstance(body, str) else ""
    if header and body and header != body:
        raise InvalidRequestError(
            "the x-request-id header and the request_id field differ",
            reason="REQUEST_ID_MISMATCH",
            field="request_id",
        )
    return check_request_id(header or body or new_request_id())


async def _begin(request: Any, context: grpc.aio.ServicerContext) -> str:
    """Resolve, bind and echo the request id; refuses (aborts) a malformed one."""
    try:
        request_id = request_id_of(request, context)
    except InvalidRequestError as exc:
        request_id = new_request_id()
        bind_request_id(request_id)
        await abort_with(context, exc, request_id)
    bind_request_id(request_id)
    context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
    return request_id


async def abort_with(context: grpc.aio.ServicerContext, err: AirlockError, request_id: str) -> None:
    status = to_status(err, request_id=request_id)
    metadata = (*status.trailing_metadata, (REQUEST_ID_HEADER, request_id))
    await context.abort(status.code, status.details, trailing_metadata=metadata)


def caller_error(exc: BaseException, request_id: str = "") -> AirlockError:
    """What the caller of a call that ended with `exc` is told: an Airlock error as it is; a call
    the caller gave up (cancelled, or a stream it stopped reading) as CANCELLED; anything else as
    INTERNAL with a generic message and the request id. The one mapping from outcomes to statuses:
    the interceptor answers with it, admission counts and audits by it."""
    if isinstance(exc, AirlockError):
        return exc
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return CancelledError("the call was cancelled")
    return AirlockError(f"internal error (request id {request_id or 'unknown'})")


def logged_error(exc: BaseException, request_id: str) -> AirlockError:
    """`caller_error(exc)`; an unexpected error's details go to the log, never to the caller (the
    request id ties the two)."""
    err = caller_error(exc, request_id)
    if err is not exc and not isinstance(exc, asyncio.CancelledError | GeneratorExit):
        _log.error(
            "internal error", exc_info=exc, extra={"request_id": request_id, "error_type": type(exc).__name__}
        )
    return err


async def _abort_for(context: grpc.aio.ServicerContext, exc: Exception, request_id: str) -> None:
    await abort_with(context, logged_error(exc, request_id), request_id)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Request ids, the guard's check and error mapping for every method but health checks."""

    def __init__(self, guard: Guard | None = None) -> None:
        self.guard = guard
        # method -> (the handler it wraps, the wrapped one); rebuilt if gRPC hands another handler
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return handler
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            self._wrapped[method] = cached = (handler, self._wrap(method, handler))
        return cached[1]

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        # Health is gRPC's own servicer (its Watch writes with `context.write`, not a generator)
        # and raises nothing of ours: Check only gets the malformed-bytes refusal, Watch nothing.
        if method.startswith(HEALTH_PREFIX):
            if handler.unary_unary is None:  # Watch: left exactly as gRPC made it
                return handler
            wrapped = wrap_handler(handler, _refuse_if_malformed, _refuse_if_malformed)
        else:
            check = self.guard.check if self.guard is not None else _admit_all
            wrapped = wrap_handler(handler, _map_unary(method, check), _map_stream(method, check))
        return wrapped._replace(request_deserializer=_tolerant(handler.request_deserializer))


def _admit_all(method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
    return None


class _Malformed:
    """Stands in for request bytes that are not a valid message, so the call is refused with
    INVALID_ARGUMENT by `_map_unary`/`_map_stream` (gRPC itself would answer UNKNOWN)."""


_MALFORMED = _Malformed()


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return _MALFORMED

    return decode


def _refuse_if_malformed(behavior: Behavior) -> Behavior:
    async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request is _MALFORMED:
            await _refuse_malformed(context)
        return await behavior(request, context)

    return run


async def _checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    """A client stream whose malformed messages end the call with INVALID_ARGUMENT."""
    async for item in requests:
        if item is _MALFORMED:
            await _refuse_malformed(context)
        yield item


def _screen(request: Any, context: grpc.aio.ServicerContext) -> Any:
    return _checked(request, context) if hasattr(request, "__aiter__") else request


async def _refuse_malformed(context: grpc.aio.ServicerContext) -> None:
    # Refused before the guard runs: nothing was decoded, so there is nothing to authorize or
    # dispatch, and the caller learns no more than that its bytes are not a message.
    request_id = new_request_id()
    bind_request_id(request_id)
    err = InvalidRequestError("request is not a valid protobuf message", reason="MALFORMED_REQUEST")
    await abort_with(context, err, request_id)


Check = Callable[[str, Any, grpc.aio.ServicerContext], Awaitable[None] | None]


def _map_unary(method: str, check: Check) -> Callable[[Behavior], Behavior]:
    def wrap(behavior: Behavior) -> Behavior:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if request is _MALFORMED:
                await _refuse_malformed(context)
            request = _screen(request, context)
            request_id = await _begin(request, context)
            try:
                if (written := check(method, request, context)) is not None:
                    await written
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort_for(context, exc, request_id)

        return run

    return wrap


def _map_stream(method: str, check: Check) -> Callable[[Behavior], Behavior]:
    def wrap(behavior: Behavior) -> Behavior:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if request is _MALFORMED:
                await _refuse_malformed(context)
            request = _screen(request, context)
            request_id = await _begin(request, context)
            try:
                if (written := check(method, request, context)) is not None:
                    await written
                async for item in behavior(request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort_for(context, exc, request_id)

        return run

    return wrap
