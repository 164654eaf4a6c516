"""Tenants without downtime: make a running stack serve the tenants of a new configuration.

`airlock up` calls `reconcile` when its configuration file (or the policy directory) changes. Only
what changed is touched; every other tenant keeps its worker and its calls:

- a tenant added gets its key (development keystore), its worker (domain scrubbed first, settings
  written), and, once that worker is ready, its routes in the gateway (through the admin socket).
  The gateway refuses a tenant the policy in service does not list: its worker keeps running,
  unrouted, and the next change (the security team's policy edit) routes it;
- a tenant removed loses its routes first (new calls: TENANT_NOT_SERVED), its calls in flight may
  finish for `gateway.grace_seconds`, then its worker is stopped and its domain scrubbed, audited in
  the supervisor's trail like any scrub.

What can't change while serving is left as it is and named: a worker whose settings differ (its
model's definition, its domains), shared workers (their tenant set is in their evidence) and every
section outside [tenants] and [models] need a restart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import grpc

from airlock.rpcstatus import from_rpc_error
from airlock.v1 import admin_pb2, admin_pb2_grpc
from control.children import Child
from control.launcher import Stack, StackError
from gateway.config import Config, TenantConfig
from gateway.config.isolation import SHARED
from gateway.keys import ensure_tenant_keys, open_keystore
from gateway.routing import Route
from serving.rpc import OWN_CONNECTION
from serving.settings import WorkerSettings

__all__ = ["Reconciled", "reconcile", "set_routes"]

LIVE_SECTIONS = ("source", "tenants", "models")  # what reconcile may change


@dataclass
class Reconciled:
    """What one reconcile did (tenant/model worker names) and what it left for a restart."""

    started: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    unrouted: list[str] = field(default_factory=list)  # tenants running without routes (policy lacks them)
    restart_needed: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.started or self.stopped)


def reconcile(
    stack: Stack, new: Config, *, say: Callable[[str], None], ready_timeout: float = 600.0
) -> Reconciled:
    """Serve `new`'s tenants; call it from the thread that started the stack (the parent-death
    signal of a worker follows the thread that started it)."""
    old, done = stack.config, Reconciled()
    if stack.pki is None or stack.supervisor is None or stack.gateway is None:
        raise StackError("the stack is not running")
    if stack.admin_socket is None:
        raise StackError('tenants change while serving through the admin socket (gateway.admin_socket = "")')
    done.restart_needed += [f"[{name}]" for name in _sections_changed(old, new)]
    tenants = _adoptable_tenants(old, new, done)
    models = {**old.models, **new.models}  # a model a kept tenant still uses stays defined
    adopted = replace(old, tenants=tenants, models=models, shared_domains=old.shared_domains)
    plan = stack.worker_plan(stack.pki, adopted)
    added = [key for key in plan if key not in stack.workers]
    removed = [key for key in stack.workers if key not in plan]
    for key in plan.keys() & stack.workers.keys():
        if _differs(stack.settings[key], plan[key][0]):
            done.restart_needed.append(f"worker-{key[0]}-{key[1]} (its model or domains changed)")
    if added:
        made = ensure_tenant_keys(open_keystore(old.keys, old.state_dir), sorted({k[0] for k in added}))
        for info in made:
            say(f"created key {info.key_id} for tenant {info.tenant} ({info.backend} keystore)")
    started: dict[tuple[str, str], Child] = {}
    for key in added:
        settings, domain = plan[key]
        say(f"tenant {key[0]}: starting worker-{key[0]}-{key[1]} ({settings.engine}, {domain.id})")
        try:
            started[key] = stack.start_worker(key, settings, domain, timeout=ready_timeout)
        except StackError as exc:
            say(f"tenant {key[0]}: worker-{key[0]}-{key[1]} did not start: {exc}")
            continue
        done.started.append(f"{key[0]}/{key[1]}")
    with stack.lock:
        stack.workers.update(started)  # supervised from now on
        stack.config = adopted
    routes = stack.routes()
    routed = {r.tenant for r in stack.routes_in_service}
    if routes != stack.routes_in_service:
        try:
            routed = set_routes(stack, routes)
        except StackError as exc:
            fresh = {r.tenant for r in routes} - {r.tenant for r in stack.routes_in_service}
            if not fresh:
                raise
            say(f"gateway refused the new tenants' routes: {exc}")
            routes = [r for r in routes if r.tenant not in fresh]
            routed = set_routes(stack, routes)
        stack.routes_in_service = routes
    for key in removed:
        name = f"worker-{key[0]}-{key[1]}"
        say(f"tenant {key[0]}: routes removed and drained; stopping {name} and scrubbing its domain")
        verified = stack.remove_worker(key)
        say(f"tenant {key[0]}: {name} stopped; domain scrub {'verified' if verified else 'NOT verified'}")
        done.stopped.append(f"{key[0]}/{key[1]}")
    done.unrouted = sorted({k[0] for k in stack.workers if k[0] != SHARED} - routed)
    stack.write_state()
    return done


def set_routes(stack: Stack, routes: list[Route], *, ready_seconds: float = 30.0) -> set[str]:
    """Have the gateway serve `routes` (waiting for drained removals and ready additions); the
    tenants routed now. StackError with the gateway's reason when it refuses."""
    socket = stack.admin_socket
    if socket is None:
        raise StackError('the gateway has no admin socket (gateway.admin_socket = "")')
    drain = stack.config.gateway.grace_seconds
    request = admin_pb2.SetRoutesRequest(
        routes=[
            admin_pb2.Route(
                tenant=r.tenant, model=r.model, engine=r.engine, address=r.address, shared=r.shared
            )
            for r in routes
        ],
        drain_seconds=drain,
        ready_seconds=ready_seconds,
    )
    # A connection of its own: the launcher lives long, and a refusal (a gateway not listening yet)
    # must not fail its next call.
    with grpc.insecure_channel(f"unix:{socket}", options=[OWN_CONNECTION]) as channel:
        try:
            reply = admin_pb2_grpc.AdminStub(channel).SetRoutes(request, timeout=drain + ready_seconds + 30)
        except grpc.RpcError as exc:
            err = from_rpc_error(exc)
            raise StackError(f"{err.message} [{err.reason}]") from None
    return {r.route.tenant for r in reply.routes}


def _differs(running: WorkerSettings, wanted: WorkerSettings) -> bool:
    return replace(wanted, listen=running.listen) != running


def _sections_changed(old: Config, new: Config) -> list[str]:
    """Top-level parts of the configuration, outside what reconcile changes, that differ."""
    return [
        f.name
        for f in dataclasses.fields(old)
        if f.name not in LIVE_SECTIONS and getattr(old, f.name) != getattr(new, f.name)
    ]


def _adoptable_tenants(old: Config, new: Config, done: Reconciled) -> dict[str, TenantConfig]:
    """`new`'s tenants, except changes that involve shared isolation, which stay as they were."""
    out = dict(new.tenants)
    for name in sorted(old.tenants.keys() | new.tenants.keys()):
        before, after = old.tenants.get(name), new.tenants.get(name)
        if before != after and any(t is not None and t.isolation == "shared" for t in (before, after)):
            done.restart_needed.append(f"tenants.{name} (shared isolation)")
            if before is None:
                out.pop(name, None)
            else:
                out[name] = before
    return out
