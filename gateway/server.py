"""The gateway's gRPC server: authenticated `Inference` relayed to the caller's tenant workers.

The servicer is thin: the guard resolved the call already (gateway/call.py: the caller, its tenant,
the worker, the validated request); the servicer admits it, builds the worker's request from it,
calls the worker with the caller's remaining deadline and relays the answer. A caller that goes
away cancels the worker call, which aborts generation in the engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from airlock.envelope import Opener
from airlock.errors import AirlockError, DeadlineExceededError, UnavailableError
from airlock.retry import first_message, once_more, rest_of
from airlock.rpcstatus import from_rpc_error
from airlock.v1 import inference_pb2 as pb
from airlock.v1 import inference_pb2_grpc, worker_pb2
from gateway.admission import Admission
from gateway.audit import AuditLog
from gateway.auth.guard import CallGuard
from gateway.call import SERVICE, Call, Generation, Routed, current_call
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


class InferenceService(inference_pb2_grpc.InferenceServicer):
    def __init__(
        self,
        router: Router,
        authorizer: Authorizer,
        *,
        admission: Admission,
        sealing: GatewaySealing,
        audit: AuditLog,
    ) -> None:
        self.router = router
        self.authorizer = authorizer
        self.admission = admission
        self.sealing = sealing
        self._audit = audit

    async def _prepare(
        self, call: Generation, request: pb.GenerateRequest
    ) -> tuple[worker_pb2.WorkerRequest, Opener | None]:
        """The worker's request, built from the resolved call: the prompt sealed for the worker
        (once it attested and holds the tenant's keys) with the opener of its answer, or an
        end-to-end prompt as it came (None: relayed untouched both ways)."""
        spec = call.spec
        work = worker_pb2.WorkerRequest(tenant=call.tenant)
        work.request.request_id, work.request.model = spec.request_id, spec.model
        work.request.params.CopyFrom(spec.sampling.to_proto())
        if not self.sealing.is_end_to_end(request):
            await self.sealing.ensure_released(call.tenant, call.model, call.worker)
        return work, self.sealing.seal(call.tenant, spec, request, work.request)

    def _rekeyed(self, call: Generation) -> Callable[[AirlockError], Awaitable[bool]]:
        """Whether a failed worker call goes once more: when the worker lost its keys (restarted, or
        missed a rotation), after attesting it and releasing them again (nothing was generated)."""

        async def recover(err: AirlockError) -> bool:
            if err.reason != "KEYS_MISSING":
                return False
            self.sealing.forget(call.tenant, call.model)
            await self.sealing.ensure_released(call.tenant, call.model, call.worker)
            return True

        return recover

    def _failed(self, call: Generation, exc: grpc.aio.AioRpcError) -> AirlockError:
        err = _worker_error(exc)
        if err.reason.startswith("SEAL_"):  # the worker refused a sealed prompt: tampered or misplaced
            audit_integrity(self._audit, call.tenant, err.reason, "request", call.request_id)
        return err

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        call = current_call(Generation)
        async with self.admission.call(call) as ticket:
            await ticket.admit(call.spec, request.ByteSize())
            work, opener = await self._prepare(call, request)

            async def attempt() -> pb.GenerateResponse:
                response: pb.GenerateResponse = await call.worker.Generate(
                    work, timeout=context.time_remaining()
                )
                return response

            try:
                response = await once_more(attempt, self._rekeyed(call))
            except grpc.aio.AioRpcError as exc:
                raise self._failed(call, exc) from None
            if opener is not None:
                response.text = open_text(opener, response.sealed_text, call.tenant, self._audit)
                response.ClearField("sealed_text")
                finish(opener, call.tenant, self._audit)
            ticket.usage(response.usage)
            ticket.response_bytes = response.ByteSize()
            return response

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        call = current_call(Generation)
        async with self.admission.call(call) as ticket:
            await ticket.admit(call.spec, request.ByteSize())
            work, opener = await self._prepare(call, request)

            async def start() -> tuple[Any, Any]:
                stream = call.worker.GenerateStream(work, timeout=context.time_remaining())
                return stream, await first_message(stream)

            stream: Any = None
            try:
                stream, first = await once_more(start, self._rekeyed(call))  # until the first chunk only
                async for batch in batches(rest_of(first, stream), size=_sealed_size):
                    # Sealed to the caller (end to end): each chunk as it is. Else what arrived
                    # while the caller took the previous message goes as one (serving/streams.py).
                    chunks = batch if opener is None else [self._opened(opener, batch, call.tenant)]
                    for chunk in chunks:
                        ticket.chunk(chunk)
                        yield chunk
            except grpc.aio.AioRpcError as exc:
                raise self._failed(call, exc) from None
            finally:
                if stream is not None:
                    stream.cancel()  # no-op when finished; aborts the engine when the caller went away
            if opener is not None:
                finish(opener, call.tenant, self._audit)

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
        call = current_call(Routed)
        try:
            ask = worker_pb2.EvidenceRequest(nonce=request.nonce, tenant=call.tenant)  # shared: per tenant
            evidence = await call.worker.GetEvidence(ask, timeout=context.time_remaining())
        except grpc.aio.AioRpcError as exc:
            raise _worker_error(exc) from None
        return pb.Attestation(model=call.model, evidence=evidence)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        """The tenant's models the caller may generate or stream with, its default marked."""
        call = current_call(Call)
        subject, tenant = call.principal.policy_subject, call.tenant
        default = self.router.default_model(tenant)
        routes = [
            r for r in self.router.models(tenant)
            if any(self.authorizer.decide(subject, tenant, f"model:{r.model}", act).allowed
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
