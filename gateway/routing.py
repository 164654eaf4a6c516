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
from gateway.channel import TOKEN_CHANNEL_OPTIONS, WorkerChannel
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
    (asked on every call, so a policy reload takes effect at once); None: nobody may share.
    `set_routes` replaces the table while the gateway serves (the launcher adds and removes tenants):
    a call already resolved keeps its worker channel, which is closed only after its calls ended."""

    def __init__(
        self,
        routes: list[Route],
        tls: ClientTls,
        *,
        audit: AuditLog,
        may_share: Callable[[str], bool] | None = None,
        max_message_bytes: int = 4 << 20,
    ) -> None:
        self._max_message_bytes = max_message_bytes
        self._credentials = grpc.ssl_channel_credentials(
            root_certificates=tls.ca.read_bytes(),
            private_key=tls.key.read_bytes(),
            certificate_chain=tls.cert.read_bytes(),
        )
        self.may_share = may_share or (lambda _tenant: False)
        self._audit = audit
        self._channels: dict[str, grpc.aio.Channel] = {}  # by worker address
        self._workers: dict[str, WorkerChannel] = {}  # by worker address: the streams on its channel
        self._ready: dict[str, bool] = {}  # by worker address
        self._watching: tuple[asyncio.Event, Callable[[], Awaitable[None]]] | None = None
        self._watches: dict[str, list[asyncio.Task[None]]] = {}  # by worker address, while watching
        self._install(routes)

    def _install(self, routes: list[Route]) -> list[tuple[grpc.aio.Channel, WorkerChannel]]:
        """Make `routes` the table, in one step; returns the channels no route uses any more."""
        table: dict[tuple[str, str], Route] = {}
        defaults: dict[str, str] = {}
        channels: dict[str, grpc.aio.Channel] = {}
        workers: dict[str, WorkerChannel] = {}
        # workers are launched with the gateway's message limit (gRPC's default is 4 MiB)
        receive = ("grpc.max_receive_message_length", max(self._max_message_bytes, 4 << 20))
        for route in routes:
            address = route.address
            if address not in channels:
                channel, worker = self._channels.get(address), self._workers.get(address)
                if channel is None or worker is None:
                    options = (*_CHANNEL_OPTIONS, receive)
                    channel = grpc.aio.secure_channel(address, self._credentials, options=options)
                    tokens = grpc.aio.secure_channel(
                        address, self._credentials, options=(*options, *TOKEN_CHANNEL_OPTIONS)
                    )  # a connection of its own: its arguments differ
                    where = {"tenant": ",".join(r.tenant for r in routes if r.address == address)}
                    worker = WorkerChannel(
                        channel, where, tokens=tokens, max_message_bytes=self._max_message_bytes
                    )
                channels[address], workers[address] = channel, worker
            table[(route.tenant, route.model)] = route
            defaults.setdefault(route.tenant, route.model)
        gone = [(c, self._workers[a]) for a, c in self._channels.items() if a not in channels]
        # Readers run on the same event loop and never await between reads: each name is swapped
        # whole, before anything below awaits.
        self.routes, self._routes, self._defaults = list(routes), table, defaults
        self._ready = {address: self._ready.get(address, False) for address in channels}
        self._channels, self._workers = channels, workers
        return gone

    async def set_routes(self, routes: list[Route], *, drain_seconds: float) -> None:
        """Serve `routes` from now on. New workers are watched at once; a worker no route names is
        no longer watched, and its channel closes once the calls on it ended (at most
        `drain_seconds`: the calls still running then are cancelled). Returns after that."""
        before = set(self._channels)
        gone = self._install(routes)
        for address in before - set(self._channels):
            for task in self._watches.pop(address, []):
                task.cancel()
        if self._watching is not None:
            stop, changed = self._watching
            for address in set(self._channels) - before:
                self._watches[address] = self._follow(address, stop, changed)
        await asyncio.gather(*(_retire(channel, worker, drain_seconds) for channel, worker in gone))

    def address_ready(self, address: str) -> bool:
        return self._ready.get(address, False)

    @property
    def tenants(self) -> list[str]:
        return list(self._defaults)

    def models(self, tenant: str) -> list[Route]:
        """The tenant's routes it may use now: a shared one only while the policy opts it in."""
        return [r for r in self.routes if r.tenant == tenant and (not r.shared or self.may_share(tenant))]

    def default_model(self, tenant: str) -> str:
        return self._defaults.get(tenant, "")

    def resolve(
        self, tenant: str, model: str, *, may_use: Callable[[str], bool] | None = None
    ) -> tuple[str, WorkerChannel]:
        """The model's name (the tenant's default when `model` is empty) and its worker. An unknown
        model's error names the models the caller may use (`may_use`; all of the tenant's without)."""
        if tenant not in self._defaults:
            raise PermissionDeniedError(f"tenant {tenant!r} is not served here", reason="TENANT_NOT_SERVED")
        name = model or self._defaults[tenant]
        route = self._routes.get((tenant, name))
        if route is None:
            usable = [r.model for r in self.models(tenant) if may_use is None or may_use(r.model)]
            raise InvalidRequestError(
                f"unknown model {name!r}; the models you may use: {', '.join(usable) or 'none'}",
                reason="UNKNOWN_MODEL",
                field="model",
            )
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
        """Follow every worker's health and keep its streams open until `stop` (workers added later
        too); await `changed()` whenever readiness flips. Open streams stay open for the calls in
        flight (until `close`)."""
        self._watching = (stop, changed)
        for address in self._channels:
            self._watches[address] = self._follow(address, stop, changed)
        await stop.wait()
        tasks = [task for tasks in self._watches.values() for task in tasks]
        self._watches, self._watching = {}, None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _follow(
        self, address: str, stop: asyncio.Event, changed: Callable[[], Awaitable[None]]
    ) -> list[asyncio.Task[None]]:
        return [asyncio.create_task(self._watch_one(address, stop, changed)),
                asyncio.create_task(self._workers[address].keep_open(stop, changed))]  # fmt: skip

    async def _watch_one(self, key: str, stop: asyncio.Event, changed: Callable[[], Awaitable[None]]) -> None:
        """Follow one worker's health until `stop`. Nothing ends it early: a lost worker, or anything
        a reply or `changed()` raises, marks the worker not ready and it is watched again (a failure
        is logged once until it changes)."""
        channel = self._channels.get(key)
        if channel is None:
            return
        stub = health_pb2_grpc.HealthStub(channel)
        where = {"tenant": ",".join(r.tenant for r in self.routes if r.address == key)}
        pause, failing = _WATCH_RETRY[0], ""
        while not stop.is_set() and key in self._channels:
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
        if address not in self._ready or self._ready[address] == ready:
            return  # no longer routed, or no change
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


async def _retire(channel: grpc.aio.Channel, worker: WorkerChannel, drain_seconds: float) -> None:
    """Close a worker no route names any more, once the requests on its streams ended (at most
    `drain_seconds`; those still running then fail)."""
    await worker.drain(drain_seconds)
    await worker.close()
    await channel.close(grace=1)


def _logged(message: str, exc: Exception, failing: str, where: dict[str, str]) -> str:
    """Log a watch failure unless it is the one logged last; returns it, to compare the next with."""
    what = f"{type(exc).__name__}: {exc}"
    if what != failing:
        _log.error(message, exc_info=exc, extra=where)
    return what
