"""The gateway's gRPC server: authenticated `Inference` relayed to the caller's tenant workers.

The servicer is thin: the guard resolved the call already (gateway/call.py: the caller, its tenant,
the worker, the validated request); the servicer hands it to the pipeline both doors share
(gateway/pipeline.py: admit, seal, call the worker with the caller's remaining deadline, open,
relay, record). A caller that goes away cancels the worker call, which aborts generation in the engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2

from airlock.v1 import inference_pb2 as pb
from airlock.v1 import inference_pb2_grpc, worker_pb2
from gateway.auth.guard import CallGuard
from gateway.call import SERVICE, Call, Generation, Routed, current_call
from gateway.health import GatewayHealth
from gateway.pipeline import Pipeline, deadline_in, worker_error
from gateway.routing import ClientTls, Route, Router, tenant_health_name
from serving.rpc import ErrorInterceptor, bind, new_server

__all__ = [
    "ClientTls",
    "InferenceService",
    "Pipeline",
    "Route",
    "Router",
    "ServerTls",
    "create_server",
    "update_health",
]


class InferenceService(inference_pb2_grpc.InferenceServicer):
    """The gRPC door: each method reads the call the guard resolved and hands it to the pipeline
    every door shares (gateway/pipeline.py), with the caller's deadline."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        deadline = deadline_in(context.time_remaining())
        return await self.pipeline.generate(current_call(Generation), request, deadline)

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        deadline = deadline_in(context.time_remaining())
        async for chunk in self.pipeline.stream(current_call(Generation), request, deadline):
            yield chunk

    async def GetAttestation(
        self, request: pb.AttestationRequest, context: grpc.aio.ServicerContext
    ) -> pb.Attestation:
        """Relay the worker's own evidence for the caller's nonce; the caller verifies it."""
        call = current_call(Routed)
        try:
            ask = worker_pb2.EvidenceRequest(nonce=request.nonce, tenant=call.tenant)  # shared: per tenant
            evidence = await call.worker.stub.GetEvidence(ask, timeout=context.time_remaining())
        except grpc.aio.AioRpcError as exc:
            raise worker_error(exc) from None
        return pb.Attestation(model=call.model, evidence=evidence)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        """The tenant's models the caller may generate or stream with, its default marked."""
        return pb.ListModelsResponse(models=self.pipeline.models(current_call(Call)))


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
    reuse_port: bool = False,
) -> tuple[grpc.aio.Server, int, int | None, health.aio.HealthServicer]:
    """Build (not start) the gateway server: a TLS port for token callers and, when `mtls_listen`
    is set, a port that requires a client certificate from the service CA. Returns the server,
    both ports (None when there is no mTLS port) and the health servicer. Reflection describes the
    public `Inference` service (and health, reflection) only: never the internal worker API.
    `reuse_port`: the ports are shared with the gateway's other processes (gateway/group.py)."""
    server, health_servicer = new_server(
        [ErrorInterceptor(guard)], [SERVICE], max_message_bytes=max_message_bytes,
        health_servicer=GatewayHealth(guard.authenticate), reuse_port=reuse_port,
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
