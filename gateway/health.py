"""The gateway's health service: overall readiness for anyone, a tenant's own only for that tenant.

`""` and `airlock.v1.Inference` answer every caller, without an identity: load balancers and
orchestrators probe them. `tenant/NAME` would tell anyone which tenants the gateway serves, so it
answers only a caller authenticated as a member of NAME (a token whose verified `tenant` is NAME on
either port, or a service certificate of NAME on the mTLS port). A caller without a credential is
refused like any other call (UNAUTHENTICATED, counted against its address, audited); a verified
caller of another tenant gets NOT_FOUND, exactly what a tenant that does not exist gets.
`List` is never served (`serving.rpc.Health`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from airlock.errors import AirlockError
from airlock.types import new_request_id
from gateway.auth.identity import Principal
from gateway.routing import TENANT_HEALTH_PREFIX
from serving.logs import bind_request_id
from serving.rpc import HEALTH_PREFIX, Health, abort_with

__all__ = ["GatewayHealth"]

Authenticate = Callable[[str, grpc.aio.ServicerContext], Principal]  # CallGuard.authenticate


class GatewayHealth(Health):
    def __init__(self, authenticate: Authenticate) -> None:
        super().__init__()
        self._authenticate = authenticate

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._admit(request.service, "Check", context)
        return await super().Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        await self._admit(request.service, "Watch", context)
        await super().Watch(request, context)

    async def _admit(self, service: str, method: str, context: grpc.aio.ServicerContext) -> None:
        """Return when the caller may learn `service`'s status; abort the call otherwise."""
        if not service.startswith(TENANT_HEALTH_PREFIX):
            return
        request_id = new_request_id()
        bind_request_id(request_id)  # the refusal's audit record and log lines carry it
        try:
            principal = self._authenticate(HEALTH_PREFIX + method, context)
        except AirlockError as exc:
            await abort_with(context, exc, request_id)
            raise  # abort raised already; for the type checker
        if principal.tenant != service[len(TENANT_HEALTH_PREFIX) :]:
            await context.abort(grpc.StatusCode.NOT_FOUND)
