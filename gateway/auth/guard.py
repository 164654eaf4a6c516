"""The gateway's call guard: authenticate, check lockouts, authorize, resolve — before any servicer runs.

One interceptor does it all, in an order that matters: authenticate; charge the home tenant's
request rate; lockout; the tenant's name; what the call asks of the policy (a model name within
bounds, no more); authorize; only then validate and route the call (gateway/call.py), so only an
authorized caller learns whether a model exists. It either refuses the call with a typed error or
leaves one resolved `Call` for the servicer (`gateway.call.current_call`). The tenant a call acts in
is the identity's own unless the `x-airlock-tenant` header names another, and then only if the
policy grants the subject a role in that tenant explicitly. Every decision is counted and audited.

Lockouts (gateway/auth/lockout.py): a verified identity for its own policy denials; a client address for
failed authentications, which never refuses a credential that verifies.

Both front doors call the same `resolve`: the gRPC door through the interceptor (`check`), the
HTTP door (gateway/http/) directly. An allowed call's authorization record is submitted to the audit
trail's group commit (gateway/audit.py): `resolve` returns it with the call, and the door awaits it
before the call goes on (it is written, and fsynced as `audit.fsync` says, by then). Refusals are
written before they are raised. A door only says what it knows of the call before anything is
checked (a `Knock`: its name, the request's headers, the client's address, the TLS auth context);
every decision after that is this module's, the same for both, and audited with the door's name.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from airlock.client import TENANT_HEADER
from airlock.errors import AuthenticationError, PermissionDeniedError
from gateway.audit import AuditLog
from gateway.auth.identity import JwtVerifier, Principal, ServiceIdentity, bearer_token
from gateway.auth.lockout import Lockout, peer_key, subject_key
from gateway.call import Call, Calls, enter
from gateway.metrics import Metrics
from gateway.policy.authz import Authorizer
from serving.logs import current_request_id
from serving.rpc import header_value

__all__ = ["TENANT_HEADER", "CallGuard", "Knock", "Written", "grpc_knock"]

_TENANT = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")

# Charges a verified caller's call against its home tenant's request rate, or raises (gateway.admission)
Gate = Callable[[Principal], None]
# What a door awaits before an allowed call goes on: its authorization record written (None: it is)
Written = Awaitable[None] | None


@dataclass(frozen=True, slots=True)
class Knock:
    """What a door knows of a call before anything is checked."""

    door: str  # "grpc" or "http": recorded with every decision about the call
    headers: Sequence[tuple[str, str]]  # names in lowercase; a name sent twice is refused where read
    peer: str  # the client's address, without the port (bounded: it reaches the audit trail)
    auth_context: Mapping[str, Any] = field(default_factory=dict)  # TLS: a verified client certificate


def grpc_knock(context: grpc.aio.ServicerContext) -> Knock:
    """The gRPC door's knock: the call's metadata, its peer and its TLS auth context."""
    metadata = context.invocation_metadata() or ()
    return Knock("grpc", metadata, _peer_host(context.peer()), context.auth_context())


class CallGuard:
    """The gateway's `serving.rpc.Guard`."""

    def __init__(
        self,
        verifier: JwtVerifier,
        services: ServiceIdentity,
        authorizer: Authorizer,
        lockout: Lockout,
        calls: Calls,
        *,
        gate: Gate,
        metrics: Metrics,
        audit: AuditLog,
    ) -> None:
        self.verifier = verifier
        self.services = services
        self.authorizer = authorizer
        self.lockout = lockout
        self.calls = calls
        self.gate = gate
        self.metrics = metrics
        self.audit = audit

    def check(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> Written:
        """The gRPC door's guard (`serving.rpc.Guard`): the resolved call becomes the RPC's; the
        interceptor awaits what is returned (its authorization record written) before the servicer."""
        call, written = self.resolve(grpc_knock(context), method, request)
        enter(call)
        return written

    def resolve(self, knock: Knock, method: str, request: Any) -> tuple[Call, Written]:
        """The call, authenticated, authorized and resolved, or a typed refusal (both doors), and
        what to await before it goes on: its authorization record written (None: written already).

        `method` is the `Inference` method the call is (the HTTP door names the one it maps to),
        `request` its message: only read."""
        principal = self.identify(knock, method)
        self.gate(principal)  # every verified call pays its rate before anything is audited
        tenant = header_value(knock.headers, TENANT_HEADER) or principal.tenant
        key = subject_key(principal.policy_subject)
        if (left := self.lockout.retry_after(key)) is not None:
            raise PermissionDeniedError(
                f"too many denied calls; locked out for {left:.0f} s", reason="LOCKED_OUT"
            )
        if not _TENANT.fullmatch(tenant):
            raise PermissionDeniedError(
                "x-airlock-tenant is not a tenant name: tenant names are lowercase letters, digits and '-'",
                reason="TENANT_INVALID",
            )
        call = self.calls.ask(method, request, principal, tenant, knock.door)
        written = self._authorize(call, method=method, peer=knock.peer, key=key) if call.action else None
        return self.calls.resolve(call, request), written

    def authenticate(self, method: str, context: grpc.aio.ServicerContext) -> Principal:
        """`identify` for a gRPC call (the health service's tenant statuses)."""
        return self.identify(grpc_knock(context), method)

    def identify(self, knock: Knock, method: str) -> Principal:
        """The verified identity of the call, or an audited, counted `AuthenticationError`.

        A credential is always verified first, and one that verifies is accepted whatever its peer's
        record: a failure counts against the peer address only, never against the identity a token
        merely claims (anyone can put another user's `sub` in a token signed by any key). A locked
        peer gets LOCKED_OUT instead of the reason for calls that failed anyway, so an attacker
        learns nothing more from it; behind NAT that peer is shared, and nobody's valid credential
        is refused for it."""
        try:
            return self._identify(knock)
        except AuthenticationError as exc:
            peer = knock.peer
            key = peer_key(peer)
            left = self.lockout.retry_after(key)
            err, cause = exc, {}
            if left is not None:
                err = AuthenticationError(
                    f"too many failed attempts from this address; locked out for {left:.0f} s",
                    reason="LOCKED_OUT",
                )
                cause = {"cause": exc.reason}  # what the call would have been refused for
            self.metrics.auth_failures.labels(err.reason).inc()
            self.audit.record(
                "authentication",
                decision="refused",
                reason=err.reason,
                **cause,
                peer=peer,
                method=method,
                door=knock.door,
                request_id=current_request_id(),
            )
            if left is None and self.lockout.failure(key):
                self.metrics.lockouts.labels("authentication").inc()
                self.audit.record("lockout", kind="authentication", key=key, peer=peer, door=knock.door,
                                  seconds=self.lockout.config.lockout_seconds,
                                  request_id=current_request_id())  # fmt: skip
            raise err from None

    def _identify(self, knock: Knock) -> Principal:
        token = bearer_token(knock.headers)
        service = self.services.principal(knock.auth_context)
        if service is not None:
            if token is not None:
                raise AuthenticationError(
                    "present a client certificate or a bearer token, not both",
                    reason="IDENTITY_AMBIGUOUS",
                )
            return service
        if token is None:
            raise AuthenticationError("missing bearer token", reason="TOKEN_MISSING")
        return self.verifier.verify(token)

    def _authorize(self, call: Call, *, method: str, peer: str, key: str) -> Written:
        principal, tenant, resource, action = call.principal, call.tenant, call.resource, call.action
        start = time.perf_counter()
        decision = self.authorizer.decide(principal.policy_subject, tenant, resource, action)
        label = tenant if tenant in self.authorizer.policy.tenants else "other"  # bounded labels
        verdict = "allow" if decision.allowed else "deny"
        self.metrics.tenant(label).authz[verdict].inc()
        # Allowed: submitted (written with the others that arrive together; the door awaits it).
        # Denied: written before the refusal is raised.
        write = self.audit.submit if decision.allowed else self.audit.record
        written = write(
            "authorization",
            decision=verdict,
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
            door=call.door,
            decision_us=round((time.perf_counter() - start) * 1e6, 1),
            request_id=call.request_id,
        )
        if decision.allowed:
            return written
        if self.lockout.failure(key):
            self.metrics.lockouts.labels("authorization").inc()
            self.audit.record("lockout", kind="authorization", key=key, subject=principal.policy_subject,
                              door=call.door, seconds=self.lockout.config.lockout_seconds,
                              request_id=current_request_id())  # fmt: skip
        raise PermissionDeniedError("not allowed by policy", reason="POLICY_DENIED")


def _peer_host(peer: str) -> str:
    """`ipv4:127.0.0.1:5000` / `ipv6:[::1]:5000` -> the address without the port."""
    _, _, address = peer.partition(":")
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host.strip("[]")[:64] or "unknown"  # an address: bounded anyway, and now provably
