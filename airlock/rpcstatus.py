"""The one boundary between Airlock errors and gRPC statuses with `google.rpc.Status` details.

Servers turn an `AirlockError` into a status code, message and rich details (`ErrorInfo` with the
stable reason, `RetryInfo`, `BadRequest`); clients turn a failed call back into the same error class.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from airlock.errors import (
    ERROR_DOMAIN,
    AirlockError,
    InvalidRequestError,
    QuotaExceededError,
    error_for_code,
)

__all__ = ["ErrorInterceptor", "abort_with", "from_rpc_error", "guard_handler", "to_status", "wrap_handler"]


def to_status(err: AirlockError, *, request_id: str = "") -> grpc.Status:
    """Encode an error as a gRPC status whose trailing metadata carries google.rpc.Status."""
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=ERROR_DOMAIN)
    if request_id:
        info.metadata["request_id"] = request_id
    details = [info]
    if isinstance(err, QuotaExceededError) and err.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(err.retry_after * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    if isinstance(err, InvalidRequestError) and err.field:
        violation = error_details_pb2.BadRequest.FieldViolation(field=err.field, description=err.message)
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    status = status_pb2.Status(code=getattr(code_pb2, err.code.name), message=err.message)
    for detail in details:
        status.details.add().Pack(detail)
    return rpc_status.to_status(status)


def from_rpc_error(call: grpc.aio.AioRpcError | grpc.RpcError) -> AirlockError:
    """Decode a failed call into the matching AirlockError, keeping reason and retry delay."""
    code = call.code()
    message = call.details() or code.name
    reason: str | None = None
    retry_after: float | None = None
    field = ""
    status = _rich_status(call)
    if status is not None:
        for any_detail in status.details:
            if any_detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                any_detail.Unpack(info)
                reason = info.reason or None
            elif any_detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                any_detail.Unpack(retry)
                retry_after = retry.retry_delay.ToNanoseconds() / 1e9
            elif any_detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                any_detail.Unpack(bad)
                if bad.field_violations:
                    field = bad.field_violations[0].field
    err = error_for_code(code, message, reason=reason)
    if isinstance(err, QuotaExceededError):
        err.retry_after = retry_after
    if isinstance(err, InvalidRequestError):
        err.field = field
    return err


def _rich_status(call: grpc.aio.AioRpcError | grpc.RpcError) -> status_pb2.Status | None:
    trailing = call.trailing_metadata() or ()
    for key, value in trailing:
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except Exception:  # a malformed detail from a peer must not hide the status code
                return None
            return status
    return None


# --- server side ---------------------------------------------------------------------------------

Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]
_log = logging.getLogger("airlock.rpc")


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


def guard_handler(
    handler: grpc.RpcMethodHandler, check: Callable[[grpc.aio.ServicerContext], None]
) -> grpc.RpcMethodHandler:
    """Return `handler` with `check(context)` run first; `check` refuses the call by raising."""

    def unary(behavior: Behavior) -> Behavior:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            check(context)
            return await behavior(request, context)

        return run

    def stream(behavior: Behavior) -> Behavior:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            check(context)
            async for item in behavior(request, context):
                yield item

        return run

    return wrap_handler(handler, unary, stream)


async def abort_with(context: grpc.aio.ServicerContext, err: AirlockError, request_id: str) -> None:
    status = to_status(err, request_id=request_id)
    await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)


async def _abort_unknown(context: grpc.aio.ServicerContext, exc: Exception, request_id: str) -> None:
    # The details go to the log, never to the caller; the request id ties the two together.
    _log.error(
        "internal error",
        exc_info=exc,
        extra={"request_id": request_id, "error_type": type(exc).__name__},
    )
    await abort_with(
        context, AirlockError(f"internal error (request id {request_id or 'unknown'})"), request_id
    )


def _request_id(request: Any) -> str:
    inner = getattr(request, "request", request)
    return str(getattr(inner, "request_id", "") or "")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps the Airlock error tree to gRPC statuses, most specific class first; hides the rest."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return wrap_handler(handler, _map_unary, _map_stream)


def _map_unary(behavior: Behavior) -> Behavior:
    async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except AirlockError as err:
            await abort_with(context, err, _request_id(request))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort_unknown(context, exc, _request_id(request))

    return run


def _map_stream(behavior: Behavior) -> Behavior:
    async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in behavior(request, context):
                yield item
        except AirlockError as err:
            await abort_with(context, err, _request_id(request))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort_unknown(context, exc, _request_id(request))

    return run
