"""Which worker serves a (tenant, model), and which of them are ready right now.

One mTLS channel per worker address; gRPC reconnects it by itself, quickly, when a worker is
restarted on the same address. Each worker's health is watched (the standard health service), so the
gateway reports SERVING only while every tenant it serves has a ready worker, and per tenant as
`tenant/<name>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from airlock.errors import InvalidRequestError, PermissionDeniedError
from airlock.v1 import worker_pb2_grpc

__all__ = ["ClientTls", "Route", "Router", "tenant_health_name"]

_log = logging.getLogger("airlock.routing")

# A restarted worker is back within a second or so; gRPC's default reconnect backoff (1 s growing to
# 2 min) would leave its channel failing long after. Keepalive finds a worker that died silently.
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
)
_WATCH_RETRY = (0.1, 1.0)  # seconds: first and longest pause before watching a lost worker again


def tenant_health_name(tenant: str) -> str:
    return f"tenant/{tenant}"


@dataclass(frozen=True)
class Route:
    tenant: str
    model: str
    engine: str
    address: str


@dataclass(frozen=True)
class ClientTls:
    """What the gateway presents to workers (mTLS) and trusts them with."""

    ca: Path
    cert: Path
    key: Path


class Router:
    """Maps (tenant, model) to one worker channel; a tenant's first model is its default."""

    def __init__(self, routes: list[Route], tls: ClientTls) -> None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=tls.ca.read_bytes(),
            private_key=tls.key.read_bytes(),
            certificate_chain=tls.cert.read_bytes(),
        )
        self.routes = routes
        self._stubs: dict[tuple[str, str], worker_pb2_grpc.WorkerStub] = {}
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        self._defaults: dict[str, str] = {}
        self._ready: dict[tuple[str, str], bool] = {}
        for route in routes:
            key = (route.tenant, route.model)
            channel = grpc.aio.secure_channel(route.address, credentials, options=_CHANNEL_OPTIONS)
            self._channels[key] = channel
            self._stubs[key] = worker_pb2_grpc.WorkerStub(channel)
            self._defaults.setdefault(route.tenant, route.model)
            self._ready[key] = False

    @property
    def tenants(self) -> list[str]:
        return list(self._defaults)

    def models(self, tenant: str) -> list[Route]:
        return [r for r in self.routes if r.tenant == tenant]

    def default_model(self, tenant: str) -> str:
        return self._defaults.get(tenant, "")

    def resolve(self, tenant: str, model: str) -> tuple[str, worker_pb2_grpc.WorkerStub]:
        if tenant not in self._defaults:
            raise PermissionDeniedError("tenant is not served here", reason="TENANT_NOT_SERVED")
        name = model or self._defaults[tenant]
        stub = self._stubs.get((tenant, name))
        if stub is None:
            raise InvalidRequestError("unknown model", reason="UNKNOWN_MODEL", field="model")
        return name, stub

    def tenant_ready(self, tenant: str) -> bool:
        """At least one of the tenant's workers reports SERVING."""
        return any(ready for (t, _), ready in self._ready.items() if t == tenant)

    def all_ready(self) -> bool:
        return all(self.tenant_ready(t) for t in self._defaults)

    async def watch(self, stop: asyncio.Event, changed: Callable[[], Awaitable[None]]) -> None:
        """Follow every worker's health until `stop`; await `changed()` whenever readiness flips."""
        tasks = [asyncio.create_task(self._watch_one(key, stop, changed)) for key in self._channels]
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch_one(
        self, key: tuple[str, str], stop: asyncio.Event, changed: Callable[[], Awaitable[None]]
    ) -> None:
        stub = health_pb2_grpc.HealthStub(self._channels[key])
        pause = _WATCH_RETRY[0]
        while not stop.is_set():
            try:
                async for reply in stub.Watch(health_pb2.HealthCheckRequest(service="")):
                    await self._set(key, reply.status == health_pb2.HealthCheckResponse.SERVING, changed)
                    pause = _WATCH_RETRY[0]
            except grpc.aio.AioRpcError as exc:
                # the worker is down or restarting: not ready until it answers again
                _log.debug("worker health watch ended: %s", exc.code().name, extra={"tenant": key[0]})
            await self._set(key, False, changed)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)
            pause = min(pause * 2, _WATCH_RETRY[1])

    async def _set(self, key: tuple[str, str], ready: bool, changed: Callable[[], Awaitable[None]]) -> None:
        if self._ready[key] == ready:
            return
        self._ready[key] = ready
        tenant, model = key
        _log.info("worker %s", "ready" if ready else "not ready", extra={"tenant": tenant, "model": model})
        await changed()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
