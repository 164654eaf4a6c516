"""Airlock client library: the SDK, the error tree and the generated protocol stubs.

This package ships alone to application teams; it never imports the gateway or the worker.
"""

from airlock.attestation import AttestationPolicy
from airlock.client import AsyncClient, Client
from airlock.envelope import SealError
from airlock.errors import (
    AirlockError,
    AttestationError,
    AuthenticationError,
    CancelledError,
    DeadlineExceededError,
    InvalidRequestError,
    MessageTooLargeError,
    PermissionDeniedError,
    QuotaExceededError,
    UnavailableError,
)
from airlock.types import Chunk, Completion, Message

__all__ = [
    "AirlockError",
    "AsyncClient",
    "AttestationError",
    "AttestationPolicy",
    "AuthenticationError",
    "CancelledError",
    "Chunk",
    "Client",
    "Completion",
    "DeadlineExceededError",
    "InvalidRequestError",
    "Message",
    "MessageTooLargeError",
    "PermissionDeniedError",
    "QuotaExceededError",
    "SealError",
    "UnavailableError",
]
