"""Airlock's one error tree, shared by the SDK, the gateway and the workers.

    AirlockError                      (INTERNAL)
    ├── AuthenticationError           UNAUTHENTICATED      no or invalid identity
    ├── PermissionDeniedError         PERMISSION_DENIED    identity valid, not allowed
    ├── QuotaExceededError            RESOURCE_EXHAUSTED   over a limit (retry_after seconds, if known)
    ├── InvalidRequestError           INVALID_ARGUMENT     bad request (field names what was wrong)
    ├── UnavailableError              UNAVAILABLE          no healthy worker; safe to retry
    ├── DeadlineExceededError         DEADLINE_EXCEEDED
    ├── CancelledError                CANCELLED            the caller went away
    └── AttestationError              FAILED_PRECONDITION  evidence does not meet policy

Each error carries a stable machine-readable `reason` (an upper-snake code such as `TOKEN_EXPIRED`),
a human message and, on the client side, the `request_id` of the failed call (quote it to operators:
every audit record and log line of the call has it). Messages never contain a token, key or payload:
they are sent to callers.
"""

from __future__ import annotations

import grpc

__all__ = [
    "AirlockError",
    "AttestationError",
    "AuthenticationError",
    "CancelledError",
    "DeadlineExceededError",
    "InvalidRequestError",
    "PermissionDeniedError",
    "QuotaExceededError",
    "UnavailableError",
    "error_for_code",
]

ERROR_DOMAIN = "airlock.dev"


class AirlockError(Exception):
    """Base of every Airlock error; unknown failures surface as this with code INTERNAL."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.request_id = ""

    def __str__(self) -> str:
        return f"{self.message} [{self.reason}]"


class AuthenticationError(AirlockError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDeniedError(AirlockError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class QuotaExceededError(AirlockError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "QUOTA_EXCEEDED"

    def __init__(
        self, message: str, *, reason: str | None = None, retry_after: float | None = None, subject: str = ""
    ) -> None:
        super().__init__(message, reason=reason)
        self.retry_after = retry_after
        self.subject = subject  # whose quota, e.g. "tenant:acme" (google.rpc.QuotaFailure)


class InvalidRequestError(AirlockError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(self, message: str, *, reason: str | None = None, field: str = "") -> None:
        super().__init__(message, reason=reason)
        self.field = field


class UnavailableError(AirlockError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class DeadlineExceededError(AirlockError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class CancelledError(AirlockError):
    code = grpc.StatusCode.CANCELLED
    default_reason = "CANCELLED"


class AttestationError(AirlockError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "ATTESTATION_INSUFFICIENT"


_BY_CODE: dict[grpc.StatusCode, type[AirlockError]] = {
    cls.code: cls
    for cls in (
        AuthenticationError,
        PermissionDeniedError,
        QuotaExceededError,
        InvalidRequestError,
        UnavailableError,
        DeadlineExceededError,
        CancelledError,
        AttestationError,
    )
}


def error_for_code(code: grpc.StatusCode, message: str, *, reason: str | None = None) -> AirlockError:
    """Build the error class that corresponds to a gRPC status code (INTERNAL for anything else)."""
    return _BY_CODE.get(code, AirlockError)(message, reason=reason)
