"""One call to the gateway, resolved once by the guard before any servicer runs.

The guard (gateway/auth/guard.py) authenticates the caller, asks `Calls.ask` what the method wants
of the policy (an action and a resource: it needs only a model name within bounds, MODEL_INVALID
otherwise), authorizes that, and has the authorized call made whole by `Calls.resolve`: the worker
its model is served by and, for a generation, the validated request with its final request id,
model and max_tokens, and the tenant's quota. The servicer reads the result once (`current_call`)
and passes it on; nothing resolves anything again, and nothing changes the caller's protobuf.

Only an authorized caller learns whether a model exists (UNKNOWN_MODEL comes after the policy), and
a generation refused here is counted and audited like any other (`refused`, gateway/admission.py).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from airlock.errors import AirlockError, InvalidRequestError
from airlock.types import GenerationSpec, Limits, check_model, validate_request
from airlock.v1 import inference_pb2 as pb
from gateway.auth.identity import Principal
from gateway.channel import WorkerChannel
from gateway.quota import QuotaLimits
from gateway.routing import Router
from serving.logs import current_request_id

__all__ = ["SERVICE", "Call", "Calls", "Generation", "Routed", "current_call", "enter"]

SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name

# method -> the policy action it asks for (on model:NAME, or on "models" for list)
ACTIONS = {
    f"/{SERVICE}/Generate": "generate",
    f"/{SERVICE}/GenerateStream": "stream",
    f"/{SERVICE}/GetAttestation": "attest",
    f"/{SERVICE}/ListModels": "list",
}
GENERATIONS = frozenset({"generate", "stream"})


@dataclass(frozen=True, slots=True)
class Call:
    """Who calls, in which tenant, and what the policy was asked (and allowed)."""

    principal: Principal
    tenant: str  # the tenant the call acts in: the identity's own, or one the policy granted
    action: str  # the policy action; "" for a method that needs an identity only (reflection)
    resource: str  # the policy resource: "model:NAME" or "models"; "" with no action
    request_id: str  # the call's, as the door resolved it
    door: str  # the front door it came through: "grpc" or "http"


@dataclass(frozen=True, slots=True)
class Routed(Call):
    """A call for a worker (GetAttestation, and every generation)."""

    model: str  # resolved: the tenant's default when the request named none
    worker: WorkerChannel  # the tenant's worker serving `model`


@dataclass(frozen=True, slots=True)
class Generation(Routed):
    """A Generate or GenerateStream call."""

    spec: GenerationSpec  # validated; request id, model and max_tokens are final
    quota: QuotaLimits | None  # the tenant's in the policy in service; None: not in it (refused)


C = TypeVar("C", bound=Call)

_current: contextvars.ContextVar[Call] = contextvars.ContextVar("airlock_call")


def enter(call: Call) -> None:
    """Make `call` the current RPC's (the guard does, once it is authorized and resolved)."""
    _current.set(call)


def current_call(kind: type[C]) -> C:
    """The current RPC's resolved call, of the kind its method gets."""
    call = _current.get(None)
    if not isinstance(call, kind):  # a servicer reached without the guard: never serve it
        raise AirlockError(f"internal error (request id {current_request_id() or 'unknown'})")
    return call


class Calls:
    """Resolves calls for the guard: the policy's view first, then everything else once allowed.

    `quota_for(tenant)` is the tenant's quota in the policy in service; `refused(call, exc)` counts
    and audits a generation that could not be resolved (Admission.refused); `may_use(call, model)`
    whether the caller may use a model, to name them when it asked for one that doesn't exist."""

    def __init__(
        self,
        router: Router,
        limits: Limits,
        *,
        quota_for: Callable[[str], QuotaLimits | None],
        refused: Callable[[Call, BaseException], None],
        may_use: Callable[[Call, str], bool] | None = None,
    ) -> None:
        self.router = router
        self.limits = limits
        self.quota_for = quota_for
        self.refused = refused
        self.may_use = may_use

    def _usable(self, call: Call) -> Callable[[str], bool] | None:
        may_use = self.may_use
        return None if may_use is None else lambda model: may_use(call, model)

    def ask(self, method: str, request: Any, principal: Principal, tenant: str, door: str) -> Call:
        """What the call asks of the policy. A model name that can't be one is refused here
        (MODEL_INVALID, never repeating it), before authorization puts it in an audit record."""
        action = ACTIONS.get(method, "")
        resource = ""
        if action == "list":
            resource = "models"
        elif action:
            model = check_model(request.model) or self.router.default_model(tenant)
            resource = f"model:{model}"
        return Call(principal, tenant, action, resource, current_request_id(), door)

    def resolve(self, call: Call, request: Any) -> Call:
        """An authorized call made whole: the request validated, then routed to the tenant's worker
        (TENANT_NOT_SERVED, UNKNOWN_MODEL, ISOLATION_NOT_ALLOWED), in that order."""
        if call.action in GENERATIONS:
            try:
                spec = validate_request(request, self.limits, call.request_id)
                model, worker = self.router.resolve(call.tenant, spec.model, may_use=self._usable(call))
            except Exception as exc:
                self.refused(call, exc)
                raise
            if model != spec.model:  # the tenant's default
                spec = GenerationSpec(spec.request_id, model, spec.messages, spec.sampling)
            return Generation(
                call.principal, call.tenant, call.action, call.resource, call.request_id, call.door,
                model=model, worker=worker, spec=spec, quota=self.quota_for(call.tenant),
            )  # fmt: skip
        if call.action == "attest":
            if not 16 <= len(request.nonce) <= 64:
                raise InvalidRequestError("nonce must be 16..64 bytes", field="nonce")
            model, worker = self.router.resolve(call.tenant, request.model, may_use=self._usable(call))
            return Routed(
                call.principal, call.tenant, call.action, call.resource, call.request_id, call.door,
                model=model, worker=worker,
            )  # fmt: skip
        return call
