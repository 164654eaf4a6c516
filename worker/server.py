"""The worker's gRPC server: the `Worker` service for the gateway, plus health and reflection.

A worker serves one tenant, or several when its isolation level is `shared`. Only the gateway may
call it: TLS requires a client certificate from the deployment's CA, and the peer interceptor admits
only the gateway's certificate name. The gateway sends generations on a few long-lived `Channel`
streams (worker/channel.py); `Generate` and `GenerateStream` answer the same requests one call each.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health

from airlock.envelope import Opener, Sealer, SealError
from airlock.errors import AttestationError, InvalidRequestError, PermissionDeniedError
from airlock.sealing import E2E_KEY_ID, e2e_info, open_prompt, request_key, response_key
from airlock.types import GenerationSpec, Limits, check_messages, check_sampling
from airlock.v1 import inference_pb2 as pb
from airlock.v1 import worker_pb2, worker_pb2_grpc
from serving.logs import current_request_id
from serving.rpc import ErrorInterceptor, bind, new_server
from serving.streams import batches
from worker.answers import fill_chunk, fill_response, text_size
from worker.attestation import WorkerAttestor
from worker.channel import ChannelSession
from worker.engine import Engine
from worker.isolation.arena import RequestState

__all__ = ["WorkerService", "WorkerTls", "create_server"]

SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name


@dataclass(frozen=True)
class WorkerTls:
    cert: Path
    key: Path
    client_ca: Path
    allowed_peer: str = "airlock-gateway"


class WorkerService(worker_pb2_grpc.WorkerServicer):
    """Serves one tenant (isolation `dedicated`) or several opted-in tenants (`shared`): each
    tenant has its own attestor (attestation key, HPKE key, released keys), never another's."""

    def __init__(
        self,
        tenant: str,
        model: str,
        engine: Engine,
        limits: Limits,
        attestor: WorkerAttestor,
        state: RequestState | None = None,
        *,
        others: Mapping[str, WorkerAttestor] | None = None,
        isolation: str = "dedicated",
        max_message_bytes: int = 4 << 20,
    ) -> None:
        self.attestors = {tenant: attestor, **(others or {})}
        if any(name != a.tenant for name, a in self.attestors.items()):
            raise ValueError("each attestor must be its own tenant's")
        self.tenant = tenant
        self.model = model
        self.engine = engine
        self.limits = limits
        self.attestor = attestor
        self.isolation = isolation
        self.state = state  # the domain arena that holds request state, zeroed per the scrub mode
        self.requests_started = 0
        self.max_message_bytes = max_message_bytes  # the server's: no channel frame may be larger
        self._sessions: set[ChannelSession] = set()
        self._draining = False

    def _attestor(self, tenant: str) -> WorkerAttestor:
        # Defence in depth: the gateway routes by tenant; the worker still refuses any other.
        attestor = self.attestors.get(tenant)
        if attestor is None:
            raise PermissionDeniedError("this worker serves another tenant", reason="WRONG_TENANT")
        return attestor

    def hold(self, tenant: str, prompt: pb.SealedPrompt) -> contextlib.AbstractContextManager[None]:
        """The request state held in the domain arena while the request runs, zeroed after it."""
        if self.state is None:
            return contextlib.nullcontext()
        return self.state.hold(tenant, prompt.SerializeToString())

    def admit(self, request: worker_pb2.WorkerRequest) -> tuple[GenerationSpec, Sealer, pb.SealedPrompt]:
        """Check and open a request (the gateway's message is only read): the prompt only ever
        arrives sealed, under a tenant key this worker was released or an end-to-end request key
        sealed to its attested HPKE key. Returns the spec, the sealer for the answer (same key, the
        other direction) and the opened prompt (the request state the domain arena holds)."""
        tenant = request.tenant
        attestor = self._attestor(tenant)
        inner = request.request
        if inner.model not in ("", self.model):
            raise InvalidRequestError("unknown model", reason="UNKNOWN_MODEL", field="model")
        if not inner.HasField("sealed_messages"):
            raise InvalidRequestError(
                "prompts must arrive sealed", reason="PLAINTEXT_REFUSED", field="messages"
            )
        if inner.messages:
            raise SealError("a request is either sealed or plain, not both", reason="SEAL_MIXED")
        request_id = current_request_id()  # the interceptor's (or the channel's): the inner id, checked once
        key_id = Opener.header_of(inner.sealed_messages).key_id
        if inner.HasField("end_to_end"):
            if inner.end_to_end.worker_id != attestor.hpke.worker_id or key_id != E2E_KEY_ID:
                raise AttestationError(
                    "sealed to another worker key; attest again", reason="ATTESTATION_STALE"
                )
            info = e2e_info(tenant, request_id, self.model)
            secret = attestor.hpke.open(inner.end_to_end.sealed_key, info)
        else:
            secret = attestor.key(key_id)  # only this tenant's released keys are looked at
        key = request_key(tenant, key_id, request_id, self.model)
        prompt = open_prompt(inner.sealed_messages, key, secret)
        messages = check_messages(prompt.messages, self.limits)
        spec = GenerationSpec(request_id, self.model, messages, check_sampling(inner.params, self.limits))
        self.requests_started += 1
        return spec, Sealer(secret, response_key(tenant, key_id, request_id, self.model)), prompt

    async def Generate(
        self, request: worker_pb2.WorkerRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        spec, sealer, prompt = self.admit(request)
        response = pb.GenerateResponse()
        with self.hold(request.tenant, prompt):
            await fill_response(response, spec, sealer, self.engine.generate(spec, tenant=request.tenant))
        return response

    async def GenerateStream(
        self, request: worker_pb2.WorkerRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        spec, sealer, prompt = self.admit(request)
        outputs = self.engine.generate(spec, tenant=request.tenant)
        with self.hold(request.tenant, prompt):
            try:
                # What the engine produced while the previous chunk was being sent goes as one
                # chunk (serving/streams.py); only the last output of a stream has a finish reason.
                async for batch in batches(outputs, size=text_size):
                    chunk = pb.GenerateChunk()
                    fill_chunk(chunk, spec, sealer, batch)
                    yield chunk
            finally:
                await outputs.aclose()  # type: ignore[attr-defined]

    async def Channel(
        self, requests: AsyncIterator[worker_pb2.GatewayFrames], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.WorkerFrames]:
        """Many requests on one long-lived stream from the gateway (worker/channel.py)."""
        session = ChannelSession(self, requests, draining=self._draining)
        self._sessions.add(session)
        try:
            async for batch in session.run():
                yield batch
        finally:
            self._sessions.discard(session)

    def drain(self) -> None:
        """Stop taking requests on channels (they are refused UNAVAILABLE) and end each channel once
        its requests are answered; unary calls are drained by the server's own stop."""
        self._draining = True
        for session in self._sessions:
            session.drain()

    async def GetEvidence(
        self, request: worker_pb2.EvidenceRequest, context: grpc.aio.ServicerContext
    ) -> pb.Evidence:
        if not request.tenant and len(self.attestors) > 1:
            raise InvalidRequestError("a shared worker attests per tenant: name it", field="tenant")
        return self._attestor(request.tenant or self.tenant).evidence(request.nonce)

    async def ReleaseKeys(
        self, request: worker_pb2.KeyRelease, context: grpc.aio.ServicerContext
    ) -> worker_pb2.KeyReleaseReply:
        attestor = self.attestors.get(request.tenant)
        if attestor is None:
            raise AttestationError("keys for a tenant this worker doesn't serve", reason="KEY_WRONG_TENANT")
        return worker_pb2.KeyReleaseReply(key_ids=attestor.release(request))

    async def Info(
        self, request: worker_pb2.WorkerInfoRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerInfo:
        return worker_pb2.WorkerInfo(
            tenant=self.tenant,
            model=self.model,
            engine=self.engine.kind,
            pid=os.getpid(),
            requests_started=self.requests_started,
            produced_tokens=self.engine.produced_tokens,
            active=self.engine.active,
            tenants=list(self.attestors),
            isolation=self.isolation,
        )


class PeerGuard:
    """Admit only the gateway's certificate (health checks excepted: they reveal nothing)."""

    def __init__(self, allowed_peer: str) -> None:
        self.allowed = allowed_peer.encode()

    def check(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        names = context.auth_context().get("x509_common_name", [])
        if self.allowed not in names:
            raise PermissionDeniedError("only the gateway may call a worker", reason="PEER_NOT_ALLOWED")


async def create_server(
    service: WorkerService, listen: str, tls: WorkerTls, *, max_message_bytes: int = 4 << 20
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Build (not start) the worker server; returns it, the bound port and its health servicer."""
    server, health_servicer = new_server(
        [ErrorInterceptor(PeerGuard(tls.allowed_peer))],
        [SERVICE],
        max_message_bytes=max_message_bytes,
    )
    worker_pb2_grpc.add_WorkerServicer_to_server(service, server)
    credentials = grpc.ssl_server_credentials(
        [(tls.key.read_bytes(), tls.cert.read_bytes())],
        root_certificates=tls.client_ca.read_bytes(),
        require_client_auth=True,
    )
    return server, bind(server, listen, credentials), health_servicer
