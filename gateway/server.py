"""The gateway's gRPC server: authenticated `Inference` relayed to the caller's tenant workers.

The servicer is thin: validate, pick the route from the verified principal's tenant (never from
the request), call the worker with the caller's remaining deadline, relay the answer.
A caller that goes away cancels the worker call, which aborts generation in the engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2

from airlock.envelope import Opener
from airlock.errors import (
    AirlockError,
    DeadlineExceededError,
    InvalidRequestError,
    UnavailableError,
)
from airlock.rpcstatus import from_rpc_error
from airlock.types import Limits, check_model, validate_request
from airlock.v1 import inference_pb2 as pb
from airlock.v1 import inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from gateway.admission import Admission
from gateway.audit import AuditLog
from gateway.auth.guard import CallGuard, current_caller
from gateway.health import GatewayHealth
from gateway.policy.authz import Authorizer
from gateway.routing import ClientTls, Route, Router, tenant_health_name
from gateway.sealing import GatewaySealing, audit_integrity, finish, open_text
from serving.rpc import ErrorInterceptor, bind, new_server
from serving.streams import batches

__all__ = [
    "ClientTls",
    "InferenceService",
    "Route",
    "Router",
    "ServerTls",
    "create_server",
    "update_health",
]

SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name


_ACTIONS = {
    f"/{SERVICE}/Generate": "generate",
    f"/{SERVICE}/GenerateStream": "stream",
    f"/{SERVICE}/GetAttestation": "attest",
}


class InferenceService(inference_pb2_grpc.InferenceServicer):
    def __init__(
        self,
        router: Router,
        limits: Limits,
        authorizer: Authorizer | None = None,
        *,
        admission: Admission | None = None,
        sealing: GatewaySealing | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        """`sealing` None relays prompts as they come: only for tests around fake workers (real
        workers refuse a prompt that is not sealed)."""
        self.router = router
        self.limits = limits
        self.authorizer = authorizer
        self.admission = admission or Admission.unlimited()
        self.sealing = sealing
        self._audit = audit or AuditLog(None)

    def resources(self, method: str, request: object, tenant: str) -> tuple[str, str] | None:
        """What a call asks to do, for the policy: `model:NAME` with generate/stream, or list models.

        Other methods (server reflection) need an authenticated caller and nothing more. A model
        name that can't be one is refused here (MODEL_INVALID), before the guard audits the call."""
        if method == f"/{SERVICE}/ListModels":
            return "models", "list"
        action = _ACTIONS.get(method)
        if action is None:
            return None
        model = check_model(getattr(request, "model", "")) or self.router.default_model(tenant)
        return f"model:{model}", action

    def _dispatch(
        self, request: pb.GenerateRequest
    ) -> tuple[worker_pb2.WorkerRequest, worker_pb2_grpc.WorkerStub]:
        tenant = current_caller().tenant
        spec = validate_request(request, self.limits)
        model, stub = self.router.resolve(tenant, spec.model)
        request.request_id = spec.request_id
        request.model = model
        request.params.max_tokens = spec.sampling.max_tokens  # what the quota reserves, made explicit
        return worker_pb2.WorkerRequest(tenant=tenant, request=request), stub

    async def _prepare(
        self, work: worker_pb2.WorkerRequest, stub: worker_pb2_grpc.WorkerStub
    ) -> Opener | None:
        """Seal the prompt for the worker (after it attested and holds the tenant's keys); returns the
        opener of its answer, or None for an end-to-end request, relayed untouched both ways."""
        if self.sealing is None:
            return None
        if not self.sealing.is_end_to_end(work.request):
            await self.sealing.ensure_released(work.tenant, work.request.model, stub)
        return self.sealing.seal(work.tenant, work.request)

    async def _rekey(self, work: worker_pb2.WorkerRequest, stub: worker_pb2_grpc.WorkerStub,
                     exc: grpc.aio.AioRpcError) -> bool:  # fmt: skip
        """A worker that lost its keys (restarted, or missed a rotation) is attested and keyed again;
        True when the call should be made once more (nothing was generated yet)."""
        if self.sealing is None or from_rpc_error(exc).reason != "KEYS_MISSING":
            return False
        self.sealing.forget(work.tenant, work.request.model)
        await self.sealing.ensure_released(work.tenant, work.request.model, stub)
        return True

    def _failed(self, work: worker_pb2.WorkerRequest, exc: grpc.aio.AioRpcError) -> AirlockError:
        err = _worker_error(exc)
        if err.reason.startswith("SEAL_"):  # the worker refused a sealed prompt: tampered or misplaced
            audit_integrity(self._audit, work.tenant, err.reason, "request", work.request.request_id)
        return err

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        async with self.admission.call("generate") as ticket:
            work, stub = self._dispatch(request)
            await ticket.admit(work.request)
            opener = await self._prepare(work, stub)
            for attempt in (1, 2):
                try:
                    response: pb.GenerateResponse = await stub.Generate(
                        work, timeout=context.time_remaining()
                    )
                    break
                except grpc.aio.AioRpcError as exc:
                    if attempt == 2 or not await self._rekey(work, stub, exc):
                        raise self._failed(work, exc) from None
            if opener is not None:
                response.text = open_text(opener, response.sealed_text, work.tenant, self._audit)
                response.ClearField("sealed_text")
                finish(opener, work.tenant, self._audit)
            ticket.usage(response.usage)
            ticket.response_bytes = response.ByteSize()
            return response

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        async with self.admission.call("stream") as ticket:
            work, stub = self._dispatch(request)
            await ticket.admit(work.request)
            opener = await self._prepare(work, stub)
            started = False
            for attempt in (1, 2):
                call = stub.GenerateStream(work, timeout=context.time_remaining())
                try:
                    async for batch in batches(call, size=_sealed_size):
                        started = True
                        # Sealed to the caller (end to end): each chunk as it is. Else what arrived
                        # while the caller took the previous message goes as one (serving/streams.py).
                        chunks = batch if opener is None else [self._opened(opener, batch, work.tenant)]
                        for chunk in chunks:
                            ticket.chunk(chunk)
                            yield chunk
                    break
                except grpc.aio.AioRpcError as exc:
                    if started or attempt == 2 or not await self._rekey(work, stub, exc):
                        raise self._failed(work, exc) from None
                finally:
                    call.cancel()  # no-op when finished; aborts the engine when the caller went away
            if opener is not None:
                finish(opener, work.tenant, self._audit)

    def _opened(self, opener: Opener, batch: list[pb.GenerateChunk], tenant: str) -> pb.GenerateChunk:
        """One plain chunk for the caller from consecutive sealed ones: their texts joined, their
        tokens added; the last one's finish reason and usage (only the final chunk has them)."""
        chunk = batch[-1]
        texts = [open_text(opener, c.sealed_text, tenant, self._audit) for c in batch]
        chunk.ClearField("sealed_text")
        chunk.text = "".join(texts)
        chunk.tokens = sum(c.tokens for c in batch)
        return chunk

    async def GetAttestation(
        self, request: pb.AttestationRequest, context: grpc.aio.ServicerContext
    ) -> pb.Attestation:
        """Relay the worker's own evidence for the caller's nonce; the caller verifies it."""
        if not 16 <= len(request.nonce) <= 64:
            raise InvalidRequestError("nonce must be 16..64 bytes", field="nonce")
        tenant = current_caller().tenant
        model, stub = self.router.resolve(tenant, request.model)
        try:
            ask = worker_pb2.EvidenceRequest(nonce=request.nonce, tenant=tenant)  # shared: per tenant
            evidence = await stub.GetEvidence(ask, timeout=context.time_remaining())
        except grpc.aio.AioRpcError as exc:
            raise _worker_error(exc) from None
        return pb.Attestation(model=model, evidence=evidence)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        caller = current_caller()
        routes = self.router.models(caller.tenant)
        default = self.router.default_model(caller.tenant)
        if self.authorizer is not None:  # list only what the caller may use
            subject = caller.principal.policy_subject
            routes = [
                r for r in routes
                if any(self.authorizer.decide(subject, caller.tenant, f"model:{r.model}", act).allowed
                       for act in ("generate", "stream"))
            ]  # fmt: skip
        return pb.ListModelsResponse(
            models=[
                pb.ModelInfo(name=r.model, engine=r.engine, is_default=r.model == default) for r in routes
            ]
        )


def _sealed_size(chunk: pb.GenerateChunk) -> int:
    return len(chunk.sealed_text.ciphertext)


_PASS_THROUGH = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}


def _worker_error(exc: grpc.aio.AioRpcError) -> AirlockError:
    """Translate a worker failure for the caller: keep what is theirs to know, hide the rest."""
    code = exc.code()
    if code in _PASS_THROUGH:
        return from_rpc_error(exc)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceededError("deadline exceeded")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return UnavailableError("no healthy worker for this model; retry later", reason="WORKER_UNAVAILABLE")
    return AirlockError("the worker failed to answer", reason="WORKER_FAILED")


@dataclass(frozen=True)
class ServerTls:
    """The gateway's own certificate, and the CA that service (mTLS) client certificates come from."""

    cert: Path
    key: Path
    service_ca: Path


def create_server(
    service: InferenceService,
    guard: CallGuard,
    listen: str,
    *,
    tls: ServerTls,
    max_message_bytes: int,
    mtls_listen: str = "",
) -> tuple[grpc.aio.Server, int, int | None, health.aio.HealthServicer]:
    """Build (not start) the gateway server: a TLS port for token callers and, when `mtls_listen`
    is set, a port that requires a client certificate from the service CA. Returns the server,
    both ports (None when there is no mTLS port) and the health servicer. Reflection describes the
    public `Inference` service (and health, reflection) only: never the internal worker API."""
    server, health_servicer = new_server(
        [ErrorInterceptor(guard)], [SERVICE], max_message_bytes=max_message_bytes,
        health_servicer=GatewayHealth(guard.authenticate),
    )  # fmt: skip
    inference_pb2_grpc.add_InferenceServicer_to_server(service, server)
    identity = [(tls.key.read_bytes(), tls.cert.read_bytes())]
    port = bind(server, listen, grpc.ssl_server_credentials(identity))
    mtls_port = None
    if mtls_listen:
        credentials = grpc.ssl_server_credentials(
            identity, root_certificates=tls.service_ca.read_bytes(), require_client_auth=True
        )
        mtls_port = bind(server, mtls_listen, credentials)
    return server, port, mtls_port, health_servicer


async def update_health(health_servicer: health.aio.HealthServicer, router: Router) -> None:
    """Publish readiness: per tenant (`tenant/<name>`), and overall ("" and the service name) only
    while every served tenant has a ready worker."""
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    for tenant in router.tenants:
        await health_servicer.set(
            tenant_health_name(tenant), serving if router.tenant_ready(tenant) else not_serving
        )
    overall = serving if router.all_ready() else not_serving
    await health_servicer.set(SERVICE, overall)
    await health_servicer.set("", overall)
