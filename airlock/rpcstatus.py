"""The one boundary between Airlock errors and gRPC statuses with `google.rpc.Status` details.

Servers turn an `AirlockError` into a status code, message and rich details (`ErrorInfo` with the
stable reason, `RetryInfo`, `QuotaFailure`, `BadRequest`); clients turn a failed call back into the
same error class.
"""

from __future__ import annotations

from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from airlock.errors import (
    ERROR_DOMAIN,
    AirlockError,
    InvalidRequestError,
    QuotaExceededError,
    error_for_code,
)
from airlock.types import REQUEST_ID_HEADER

M = TypeVar("M", bound=Message)

__all__ = ["from_rpc_error", "status_of", "to_status"]


def to_status(err: AirlockError, *, request_id: str = "") -> grpc.Status:
    """Encode an error as a gRPC status whose trailing metadata carries google.rpc.Status."""
    return rpc_status.to_status(status_of(err, request_id=request_id))


def status_of(err: AirlockError, *, request_id: str = "") -> status_pb2.Status:
    """The error as a google.rpc.Status: code, message and details (the reason, retry delay,
    quota and field violations), as a status's trailing metadata or a worker channel frame has it."""
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=ERROR_DOMAIN)
    if request_id:
        info.metadata["request_id"] = request_id
    details = [info]
    if isinstance(err, QuotaExceededError) and err.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(err.retry_after * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    if isinstance(err, QuotaExceededError):
        violation = error_details_pb2.QuotaFailure.Violation(subject=err.subject, description=err.message)
        details.append(error_details_pb2.QuotaFailure(violations=[violation]))
    if isinstance(err, InvalidRequestError) and err.field:
        violation = error_details_pb2.BadRequest.FieldViolation(field=err.field, description=err.message)
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    status = status_pb2.Status(code=getattr(code_pb2, err.code.name), message=err.message)
    for detail in details:
        status.details.add().Pack(detail)
    return status


def from_rpc_error(call: grpc.aio.AioRpcError | grpc.RpcError) -> AirlockError:
    """Decode a failed call into the matching AirlockError, keeping reason and retry delay."""
    code = call.code()
    message = call.details() or code.name
    reason: str | None = None
    retry_after: float | None = None
    field = ""
    request_id = _header(call, REQUEST_ID_HEADER)
    subject = ""
    for detail in _rich_status(call):
        if (info := _unpack(detail, error_details_pb2.ErrorInfo)) is not None:
            reason = info.reason or None
            request_id = info.metadata.get("request_id", request_id)
        elif (retry := _unpack(detail, error_details_pb2.RetryInfo)) is not None:
            retry_after = retry.retry_delay.ToNanoseconds() / 1e9
        elif (quota := _unpack(detail, error_details_pb2.QuotaFailure)) is not None and quota.violations:
            subject = quota.violations[0].subject
        elif (bad := _unpack(detail, error_details_pb2.BadRequest)) is not None and bad.field_violations:
            field = bad.field_violations[0].field
    err = error_for_code(code, message, reason=reason)
    if isinstance(err, QuotaExceededError):
        err.retry_after = retry_after
        err.subject = subject
    if isinstance(err, InvalidRequestError):
        err.field = field
    err.request_id = request_id
    return err


def _header(call: grpc.aio.AioRpcError | grpc.RpcError, name: str) -> str:
    for key, value in call.trailing_metadata() or ():
        if key == name and isinstance(value, str):
            return value
    return ""


def _rich_status(call: grpc.aio.AioRpcError | grpc.RpcError) -> list[Any]:
    """The details of the peer's google.rpc.Status; empty when absent or malformed."""
    for key, value in call.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except DecodeError:  # a malformed status from a peer must not hide the status code
                return []
            return list(status.details)
    return []


def _unpack(detail: Any, cls: type[M]) -> M | None:
    if not detail.Is(cls.DESCRIPTOR):
        return None
    message: M = cls()
    try:
        detail.Unpack(message)
    except DecodeError:
        return None
    return message
