"""What operators see and change in a running gateway, through its admin socket: its status, and its
routes (the launcher adds and removes tenants without restarting anyone else).

A route change is checked whole before anything changes: every route well formed, every tenant in
the policy in service and holding an active key. Then the router serves the new table at once (a
removed tenant's new calls get TENANT_NOT_SERVED; its calls in flight may finish for the drain
time), the policy's list of served tenants follows it (a reload that was refused because it dropped
a tenant still routed is tried again), readiness is published, and the change is audited.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from airlock.errors import InvalidRequestError
from airlock.v1 import admin_pb2
from gateway.audit import AuditLog
from gateway.auth.lockout import Lockout
from gateway.config.schema import ENGINES, NAME
from gateway.keys.store import Keystore
from gateway.metrics import Metrics
from gateway.policy.authz import Authorizer
from gateway.routing import Route, Router
from gateway.sealing import GatewaySealing
from serving.logs import current_request_id

__all__ = ["MAX_ROUTES", "LiveGateway", "Ports", "route_proto"]

MAX_ROUTES = 4096
MAX_DRAIN_SECONDS = 600.0
MAX_READY_SECONDS = 120.0
_ADDRESS = re.compile(r"[A-Za-z0-9.\-\[\]:]{1,253}:\d{1,5}")


@dataclass(frozen=True)
class Ports:
    port: int
    mtls_port: int | None
    metrics_port: int | None


class LiveGateway:
    """The Admin service's view of the gateway it runs in."""

    def __init__(
        self,
        *,
        router: Router,
        authorizer: Authorizer,
        sealing: GatewaySealing,
        lockout: Lockout,
        metrics: Metrics,
        audit: AuditLog,
        ports: Ports,
        grace_seconds: float,
        publish: Callable[[], Awaitable[None]],
    ) -> None:
        self.router = router
        self.authorizer = authorizer
        self.sealing = sealing
        self.lockout = lockout
        self.metrics = metrics
        self.audit = audit
        self.ports = ports
        self.grace_seconds = grace_seconds
        self.publish = publish  # readiness to the health service, after routes changed
        self.started = time.monotonic()
        self._changing = asyncio.Lock()

    @property
    def keystore(self) -> Keystore:
        return self.sealing.keystore

    # -- status -----------------------------------------------------------------------------------
    def status(self) -> admin_pb2.StatusResponse:
        authorizer, router = self.authorizer, self.router
        policy = authorizer.policy
        last = authorizer.last_reload
        entries = self.lockout.entries()
        locked = sum(1 for e in entries if e.seconds_left > 0)
        return admin_pb2.StatusResponse(
            pid=os.getpid(),
            uptime_seconds=time.monotonic() - self.started,
            policy=admin_pb2.PolicyStatus(
                generation=authorizer.generation,
                directory=str(policy.directory),
                last_reload=last.result if last else "",
                last_reload_unix=last.at if last else 0.0,
                last_reload_reason=last.reason if last else "",
                rules=len(policy.rules),
                links=len(policy.links),
                lint_warnings=authorizer.lint_warnings,
            ),
            routes=self._route_status(),
            tenants=[self._tenant(name) for name in sorted(set(router.tenants) | set(policy.tenants))],
            lockouts=locked,
            lockout_failures=len(entries) - locked,
            port=self.ports.port,
            mtls_port=self.ports.mtls_port or 0,
            metrics_port=self.ports.metrics_port or 0,
            serving=router.all_ready(),
        )

    def _route_status(self) -> list[admin_pb2.RouteStatus]:
        return [
            admin_pb2.RouteStatus(
                route=route_proto(r),
                ready=self.router.address_ready(r.address),
                is_default=self.router.default_model(r.tenant) == r.model,
            )
            for r in self.router.routes
        ]

    def _tenant(self, name: str) -> admin_pb2.TenantStatus:
        settings = self.authorizer.policy.tenants.get(name)
        quota = settings.quota if settings is not None else None
        try:
            keys = [admin_pb2.KeyStatus(key_id=k.key_id, state=k.state) for k in self.keystore.list(name)]
        except Exception:  # a keystore mid-change: the status says nothing of keys rather than fail
            keys = []
        label = name if settings is not None else "other"  # the metrics' own labels
        ok = _total(self.metrics.requests, "airlock_requests_total", tenant=label, code="OK")
        tokens = {
            kind: _total(self.metrics.tokens, "airlock_tokens_total", tenant=label, kind=kind)
            for kind in ("prompt", "completion")
        }
        in_flight = self.metrics.registry.get_sample_value("airlock_concurrent_streams", {"tenant": label})
        return admin_pb2.TenantStatus(
            name=name,
            keys=keys,
            requests_per_second=quota.requests_per_second if quota else 0.0,
            tokens_per_minute=quota.tokens_per_minute if quota else 0,
            concurrent_streams=quota.concurrent_streams if quota else 0,
            in_flight=int(in_flight or 0),
            requests_ok=ok,
            requests_failed=_total(self.metrics.requests, "airlock_requests_total", tenant=label) - ok,
            quota_refusals=_total(
                self.metrics.quota_rejections, "airlock_quota_rejections_total", tenant=label
            ),
            prompt_tokens=tokens["prompt"],
            completion_tokens=tokens["completion"],
            in_policy=settings is not None,
        )

    # -- routes -----------------------------------------------------------------------------------
    async def set_routes(self, request: admin_pb2.SetRoutesRequest) -> admin_pb2.SetRoutesResponse:
        routes = _routes(request)
        drain = request.drain_seconds or self.grace_seconds
        if not 0 <= drain <= MAX_DRAIN_SECONDS:
            raise InvalidRequestError(
                f"drain_seconds must be 0..{MAX_DRAIN_SECONDS:.0f}", field="drain_seconds"
            )
        if not 0 <= request.ready_seconds <= MAX_READY_SECONDS:
            raise InvalidRequestError(
                f"ready_seconds must be 0..{MAX_READY_SECONDS:.0f}", field="ready_seconds"
            )
        async with self._changing:  # one change at a time, each checked against the table it replaces
            before = list(self.router.routes)
            added = [r for r in routes if r not in before]
            removed = [r for r in before if r not in routes]
            await self._check_tenants({r.tenant for r in added})
            self.audit.record(
                "routes_set", added=[_name(r) for r in added], removed=[_name(r) for r in removed],
                routes=len(routes), via="admin-socket", request_id=current_request_id(),
            )  # fmt: skip
            tenants = list(dict.fromkeys(r.tenant for r in routes))
            self.authorizer.required_tenants = tuple(tenants)
            drained = asyncio.ensure_future(self.router.set_routes(routes, drain_seconds=drain))
            for route in removed:
                self.sealing.forget(route.tenant, route.model)
            await self.publish()
            last = self.authorizer.last_reload
            if last is not None and last.result == "rejected" and removed:
                # Refused because it dropped a tenant that was still routed? Not any more.
                await self.authorizer.reload()
            await self._ready(added, request.ready_seconds)
            await drained
            await self.publish()
        return admin_pb2.SetRoutesResponse(
            added=[route_proto(r) for r in added],
            removed=[route_proto(r) for r in removed],
            routes=self._route_status(),
        )

    async def _check_tenants(self, tenants: set[str]) -> None:
        """A tenant gets routes only once the policy in service lists it and it holds an active key."""
        policy = self.authorizer.policy
        missing = sorted(t for t in tenants if t not in policy.tenants)
        if missing:
            raise InvalidRequestError(
                f"tenant(s) {', '.join(missing)} not in the policy in service "
                f"({policy.directory / 'tenants.toml'}, generation {self.authorizer.generation}): add them "
                "there first",
                reason="ROUTE_REFUSED",
                field="routes",
            )
        await asyncio.to_thread(self.keystore.reload)  # a key the launcher just made
        active = {k.tenant for k in self.keystore.list() if k.state == "active"}
        keyless = sorted(tenants - active)
        if keyless:
            raise InvalidRequestError(
                f"tenant(s) {', '.join(keyless)} have no active key: `airlock keys create --tenant NAME`",
                reason="ROUTE_REFUSED",
                field="routes",
            )

    async def _ready(self, added: list[Route], seconds: float) -> None:
        """Wait (at most `seconds`) until the new routes' workers are watched ready."""
        deadline = time.monotonic() + seconds
        while added and not all(self.router.address_ready(r.address) for r in added):
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(0.05)


def _total(metric: Any, name: str, **labels: str) -> int:
    """The sum of a labelled metric's samples that match `labels`."""
    return int(
        sum(
            sample.value
            for family in metric.collect()
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )
    )


def _name(route: Route) -> str:
    return f"{route.tenant}/{route.model}"


def route_proto(route: Route) -> admin_pb2.Route:
    return admin_pb2.Route(
        tenant=route.tenant,
        model=route.model,
        engine=route.engine,
        address=route.address,
        shared=route.shared,
    )


def _routes(request: admin_pb2.SetRoutesRequest) -> list[Route]:
    """The request's routes, each checked; a tenant's models named once."""
    if len(request.routes) > MAX_ROUTES:
        raise InvalidRequestError(f"at most {MAX_ROUTES} routes", reason="ROUTE_INVALID", field="routes")
    routes, seen = [], set()
    for i, r in enumerate(request.routes):
        where = f"routes[{i}]"
        if not NAME.fullmatch(r.tenant) or not NAME.fullmatch(r.model):
            raise InvalidRequestError(
                f"{where}: tenant and model are names (a-z, 0-9, '-')", reason="ROUTE_INVALID", field=where
            )
        if r.engine not in ENGINES:
            raise InvalidRequestError(
                f"{where}: engine must be one of {', '.join(ENGINES)}", reason="ROUTE_INVALID", field=where
            )
        if not _ADDRESS.fullmatch(r.address) or int(r.address.rsplit(":", 1)[1]) > 65535:
            raise InvalidRequestError(
                f"{where}: address must be HOST:PORT", reason="ROUTE_INVALID", field=where
            )
        if (r.tenant, r.model) in seen:
            raise InvalidRequestError(
                f"{where}: {r.tenant}/{r.model} is routed twice", reason="ROUTE_INVALID", field=where
            )
        seen.add((r.tenant, r.model))
        routes.append(Route(r.tenant, r.model, r.engine, r.address, shared=r.shared))
    return routes
