"""The engine interface every model backend implements, and what it yields."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from airlock.types import GenerationSpec

__all__ = ["Engine", "EngineOutput"]


@dataclass(frozen=True)
class EngineOutput:
    """Text produced since the previous output; the last output has `finish_reason` and totals."""

    text: str
    tokens: int
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Engine(Protocol):
    """An async token stream per request.

    Leaving the iteration early (break, `aclose()`, task cancellation) stops the generation,
    exactly like `abort(request_id)`; `produced_tokens` counts every token generated since start.
    `tenant` is the request's tenant: a shared engine keeps tenants apart by it (vLLM's per-tenant
    `cache_salt`, KV scrub on a tenant switch); an engine with no cross-request state ignores it.
    """

    kind: str
    produced_tokens: int
    active: int

    def generate(self, spec: GenerationSpec, *, tenant: str = "") -> AsyncIterator[EngineOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    async def close(self) -> None: ...
