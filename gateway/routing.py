"""Which worker serves a (tenant, model), and which of them are ready right now.

One mTLS channel per worker address (a shared worker's tenants share it); gRPC reconnects it by
itself, quickly, when a worker is restarted on the same address. Generations travel on a few
long-lived streams over it (gateway/channel.py). Each worker's health is watched (the standard
health service) and its streams kept open, so the gateway reports SERVING only while every tenant it
serves has a worker that says it is ready and whose streams are open, and per tenant as
`tenant/<name>`. A route to a shared worker is used only while the
policy in service opts its tenant in to shared isolation; otherwise the call fails closed, audited.
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

from airlock.errors import AttestationError, InvalidRequestError, PermissionDeniedError
from gateway.audit import AuditLog
from gateway.channel import WorkerChannel
from serving.logs import current_request_id

__all__ = ["TENANT_HEALTH_PREFIX", "ClientTls", "Route", "Router", "tenant_health_name"]

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


TENANT_HEALTH_PREFIX = "tenant/"  # answered only to that tenant's callers (gateway/health.py)


def tenant_health_name(tenant: str) -> str:
    return f"{TENANT_HEALTH_PREFIX}{tenant}"


@dataclass(frozen=True)
class Route:
    tenant: str
    model: str
    engine: str
    address: str
    shared: bool = False  # a worker that serves several tenants (isolation level "shared")


@dataclass(frozen=True)
class ClientTls:
    """What the gateway presents to workers (mTLS) and trusts them with."""

    ca: Path
    cert: Path
    key: Path


class Router:
    """Maps (tenant, model) to one worker channel; a tenant's first model is its default.

    `may_share(tenant)` says whether the policy in service opts a tenant in to shared workers
    (asked on every call, so a policy reload takes effect at once); None: nobody may share."""

    def __init__(
        self,
        routes: list[Route],
        tls: ClientTls,
        *,
        audit: AuditLog,
        may_share: Callable[[str], bool] | None = None,
        max_message_bytes: int = 4 << 20,
    ) -> None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=tls.ca.read_bytes(),
            private_key=tls.key.read_bytes(),
            certificate_chain=tls.cert.read_bytes(),
        )
        self.routes = routes
        self.may_share = may_share or (lambda _tenant: False)
        self._audit = audit
        self._routes: dict[tuple[str, str], Route] = {}
        self._workers: dict[str, WorkerChannel] = {}  # by worker address
        self._channels: dict[str, grpc.aio.Channel] = {}  # by worker address
        self._defaults: dict[str, str] = {}
        self._ready: dict[str, bool] = {}  # by worker address
        for route in routes:
            key = (route.tenant, route.model)
            channel = self._channels.get(route.address)
            if channel is None:
                # workers are launched with the gateway's message limit (gRPC's default is 4 MiB)
                receive = ("grpc.max_receive_message_length", max(max_message_bytes, 4 << 20))
                channel = grpc.aio.secure_channel(
                    route.address, credentials, options=(*_CHANNEL_OPTIONS, receive)
                )
                self._channels[route.address] = channel
                where = {"tenant": ",".join(r.tenant for r in routes if r.address == route.address)}
                worker = WorkerChannel(channel, where, max_message_bytes=max_message_bytes)
                self._workers[route.address] = worker
                self._ready[route.address] = False
            self._routes[key] = route
            self._defaults.setdefault(route.tenant, route.model)

    @property
    def tenants(self) -> list[str]:
        return list(self._defaults)

    def models(self, tenant: str) -> list[Route]:
        """The tenant's routes it may use now: a shared one only while the policy opts it in."""
        return [r for r in self.routes if r.tenant == tenant and (not r.shared or self.may_share(tenant))]

    def default_model(self, tenant: str) -> str:
        return self._defaults.get(tenant, "")

    def resolve(self, tenant: str, model: str) -> tuple[str, WorkerChannel]:
        if tenant not in self._defaults:
            raise PermissionDeniedError("tenant is not served here", reason="TENANT_NOT_SERVED")
        name = model or self._defaults[tenant]
        route = self._routes.get((tenant, name))
        if route is None:
            raise InvalidRequestError("unknown model", reason="UNKNOWN_MODEL", field="model")
        if route.shared and not self.may_share(tenant):
            # Fail closed: the security team withdrew (or never gave) this tenant's opt-in.
            self._audit.record("isolation", decision="refused", tenant=tenant, model=name,
                               reason="ISOLATION_NOT_ALLOWED", request_id=current_request_id())  # fmt: skip
            raise AttestationError(
                "this tenant's model runs on a shared worker and the policy does not opt the tenant in "
                "to shared isolation",
                reason="ISOLATION_NOT_ALLOWED",
            )
        return name, self._workers[route.address]

    def tenant_ready(self, tenant: str) -> bool:
        """At least one of the tenant's workers reports SERVING and has its channel open."""
        return any(self._ready[r.address] and self._workers[r.address].is_open
                   for r in self.routes if r.tenant == tenant)  # fmt: skip

    def all_ready(self) -> bool:
        return all(self.tenant_ready(t) for t in self._defaults)

    async def watch(self, stop: asyncio.Event, changed: Callable[[], Awaitable[None]]) -> None:
        """Follow every worker's health and keep its channel open until `stop`; await `changed()`
        whenever readiness flips. Open channels stay open for the calls in flight (until `close`)."""
        tasks = [asyncio.create_task(self._watch_one(key, stop, changed)) for key in self._channels]
        tasks += [asyncio.create_task(w.keep_open(stop, changed)) for w in self._workers.values()]
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch_one(self, key: str, stop: asyncio.Event, changed: Callable[[], Awaitable[None]]) -> None:
        """Follow one worker's health until `stop`. Nothing ends it early: a lost worker, or anything
        a reply or `changed()` raises, marks the worker not ready and it is watched again (a failure
        is logged once until it changes)."""
        stub = health_pb2_grpc.HealthStub(self._channels[key])
        where = {"tenant": ",".join(r.tenant for r in self.routes if r.address == key)}
        pause, failing = _WATCH_RETRY[0], ""
        while not stop.is_set():
            try:
                async for reply in stub.Watch(health_pb2.HealthCheckRequest(service="")):
                    await self._set(key, reply.status == health_pb2.HealthCheckResponse.SERVING, changed)
                    pause, failing = _WATCH_RETRY[0], ""
            except grpc.aio.AioRpcError as exc:
                # the worker is down or restarting: not ready until it answers again
                _log.debug("worker health watch ended: %s", exc.code().name, extra=where)
            except Exception as exc:
                failing = _logged("worker health watch failed; watching again", exc, failing, where)
            try:
                await self._set(key, False, changed)
            except Exception as exc:
                failing = _logged("worker readiness not published", exc, failing, where)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)
            pause = min(pause * 2, _WATCH_RETRY[1])

    async def _set(self, address: str, ready: bool, changed: Callable[[], Awaitable[None]]) -> None:
        if self._ready[address] == ready:
            return
        self._ready[address] = ready
        served = [r for r in self.routes if r.address == address]
        where = {"tenant": ",".join(r.tenant for r in served), "model": served[0].model if served else ""}
        _log.info("worker %s", "ready" if ready else "not ready", extra=where)
        await changed()

    async def close(self) -> None:
        for worker in self._workers.values():
            await worker.close()
        for channel in self._channels.values():
            await channel.close()


def _logged(message: str, exc: Exception, failing: str, where: dict[str, str]) -> str:
    """Log a watch failure unless it is the one logged last; returns it, to compare the next with."""
    what = f"{type(exc).__name__}: {exc}"
    if what != failing:
        _log.error(message, exc_info=exc, extra=where)
    return what
