"""The gateway's call guard: authenticate, check lockouts, authorize — before any servicer runs.

One interceptor does all three, in that order, and either refuses the call with a typed error or
leaves the verified caller in `current_caller()`. The tenant a call acts in is the identity's own
unless the `x-airlock-tenant` header names another, and then only if the policy grants the
subject a role in that tenant explicitly. Every decision is counted and audited.
"""

from __future__ import annotations

import contextvars
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from airlock.client import TENANT_HEADER
from airlock.errors import AuthenticationError, PermissionDeniedError
from airlock.logs import current_request_id
from airlock.serving import header_value
from gateway.audit import AuditLog
from gateway.authz import Authorizer
from gateway.identity import JwtVerifier, Principal, ServiceIdentity, bearer_token
from gateway.lockout import Lockout
from gateway.metrics import Metrics

__all__ = ["TENANT_HEADER", "CallGuard", "Caller", "current_caller"]

_TENANT = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")

# (method, request, tenant) -> (resource, action); None: authentication alone suffices (reflection)
Resources = Callable[[str, Any, str], tuple[str, str] | None]
# Charges a verified caller's call against its home tenant's request rate, or raises (gateway.admission)
Gate = Callable[[Principal], None]


@dataclass(frozen=True)
class Caller:
    principal: Principal
    tenant: str  # the tenant this call acts in (authorized)


_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("airlock_caller")


def current_caller() -> Caller:
    """The verified, authorized caller of the current RPC (set before the servicer runs)."""
    return _caller.get()


class CallGuard:
    """The gateway's `airlock.serving.Guard`."""

    def __init__(
        self,
        verifier: JwtVerifier,
        services: ServiceIdentity,
        authorizer: Authorizer,
        lockout: Lockout,
        resources: Resources,
        *,
        metrics: Metrics,
        audit: AuditLog,
        gate: Gate | None = None,
    ) -> None:
        self.verifier = verifier
        self.services = services
        self.authorizer = authorizer
        self.lockout = lockout
        self.resources = resources
        self.metrics = metrics
        self.audit = audit
        self.gate = gate

    def check(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        peer = _peer_host(context.peer())
        metadata = context.invocation_metadata() or ()
        principal = self._authenticate(peer, method, metadata, context)
        if self.gate is not None:  # every verified call pays its rate before anything is audited
            self.gate(principal)
        tenant = header_value(metadata, TENANT_HEADER) or principal.tenant
        key = f"subject:{principal.policy_subject}"
        if (left := self.lockout.retry_after(key)) is not None:
            raise PermissionDeniedError(
                f"too many denied calls; locked out for {left:.0f} s", reason="LOCKED_OUT"
            )
        if not _TENANT.fullmatch(tenant):
            raise PermissionDeniedError("not a tenant name", reason="TENANT_INVALID")
        wanted = self.resources(method, request, tenant)
        if wanted is not None:
            self._authorize(principal, tenant, *wanted, method=method, peer=peer, key=key)
        _caller.set(Caller(principal, tenant))

    def _authenticate(
        self, peer: str, method: str, metadata: Any, context: grpc.aio.ServicerContext
    ) -> Principal:
        token: str | None = None
        key = f"peer:{peer}|-"
        try:
            token = bearer_token(metadata)
            service = self.services.principal(context.auth_context())
            if service is not None:
                key = f"peer:{peer}|{service.subject}"
                if token is not None:
                    raise AuthenticationError(
                        "present a client certificate or a bearer token, not both",
                        reason="IDENTITY_AMBIGUOUS",
                    )
                self._refuse_if_locked(key)
                return service
            if token is None:
                raise AuthenticationError("missing bearer token", reason="TOKEN_MISSING")
            key = f"peer:{peer}|{self.verifier.claimed_identity(token)}"
            self._refuse_if_locked(key)
            return self.verifier.verify(token)
        except AuthenticationError as exc:
            self.metrics.auth_failures.labels(exc.reason).inc()
            self.audit.record(
                "authentication",
                decision="refused",
                reason=exc.reason,
                peer=peer,
                method=method,
                request_id=current_request_id(),
            )
            if exc.reason != "LOCKED_OUT" and self.lockout.failure(key):
                self.metrics.lockouts.labels("authentication").inc()
                self.audit.record("lockout", kind="authentication", peer=peer,
                                  seconds=self.lockout.config.lockout_seconds,
                                  request_id=current_request_id())  # fmt: skip
            raise

    def _refuse_if_locked(self, key: str) -> None:
        if (left := self.lockout.retry_after(key)) is not None:
            raise AuthenticationError(
                f"too many failed attempts; locked out for {left:.0f} s", reason="LOCKED_OUT"
            )

    def _authorize(
        self,
        principal: Principal,
        tenant: str,
        resource: str,
        action: str,
        *,
        method: str,
        peer: str,
        key: str,
    ) -> None:
        start = time.perf_counter()
        decision = self.authorizer.decide(principal.policy_subject, tenant, resource, action)
        label = tenant if tenant in self.authorizer.policy.tenants else "other"  # bounded labels
        self.metrics.authz_decisions.labels(label, "allow" if decision.allowed else "deny").inc()
        self.audit.record(
            "authorization",
            decision="allow" if decision.allowed else "deny",
            subject=principal.policy_subject,
            method=principal.method,
            home_tenant=principal.tenant,
            tenant=tenant,
            resource=resource,
            action=action,
            rule_line=decision.rule.line if decision.rule else None,
            generation=self.authorizer.generation,
            peer=peer,
            rpc=method,
            decision_us=round((time.perf_counter() - start) * 1e6, 1),
            request_id=current_request_id(),
        )
        if decision.allowed:
            return
        if self.lockout.failure(key):
            self.metrics.lockouts.labels("authorization").inc()
            self.audit.record("lockout", kind="authorization", subject=principal.policy_subject,
                              seconds=self.lockout.config.lockout_seconds,
                              request_id=current_request_id())  # fmt: skip
        raise PermissionDeniedError("not allowed by policy", reason="POLICY_DENIED")


def _peer_host(peer: str) -> str:
    """`ipv4:127.0.0.1:5000` / `ipv6:[::1]:5000` -> the address without the port."""
    _, _, address = peer.partition(":")
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host.strip("[]") or "unknown"
