"""Airlock client library: the SDK, the error tree and the generated protocol stubs.

This package ships alone to application teams (grpcio, protobuf and cryptography are all it needs);
it never imports the gateway, the worker or the control plane. Names are loaded on first use, so
importing one module of it (`airlock.types`) does not load the whole client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
        PermissionDeniedError,
        QuotaExceededError,
        UnavailableError,
    )
    from airlock.types import Chunk, Completion, Message

_WHERE = {
    "AttestationPolicy": "airlock.attestation",
    "AsyncClient": "airlock.client",
    "Client": "airlock.client",
    "SealError": "airlock.envelope",
    "AirlockError": "airlock.errors",
    "AttestationError": "airlock.errors",
    "AuthenticationError": "airlock.errors",
    "CancelledError": "airlock.errors",
    "DeadlineExceededError": "airlock.errors",
    "InvalidRequestError": "airlock.errors",
    "PermissionDeniedError": "airlock.errors",
    "QuotaExceededError": "airlock.errors",
    "UnavailableError": "airlock.errors",
    "Chunk": "airlock.types",
    "Completion": "airlock.types",
    "Message": "airlock.types",
}

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
    "PermissionDeniedError",
    "QuotaExceededError",
    "SealError",
    "UnavailableError",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'airlock' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value
