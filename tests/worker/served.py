"""An in-process echo worker for acme on real mTLS, attested and released acme's keys, with what a
test acting as the gateway needs: sealed worker requests and the openers of their answers."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from airlock.attestation import AttestationPolicy
from airlock.envelope import Opener
from airlock.types import Limits, validate_request
from airlock.v1 import inference_pb2 as pb
from airlock.v1 import worker_pb2, worker_pb2_grpc
from control.pki import DevPki, ensure_dev_pki, worker_attestation_cert
from gateway.audit import AuditLog
from gateway.config import KeysConfig
from gateway.keys import ensure_tenant_keys, open_keystore
from gateway.sealing import GatewaySealing
from worker.attestation import WorkerAttestor
from worker.engine import Engine
from worker.engines.echo import EchoEngine
from worker.server import WorkerService, WorkerTls, create_server

LIMITS = Limits(max_tokens=4096, default_max_tokens=64)
_ids = itertools.count(1)


@dataclass
class Served:
    pki: DevPki
    address: str
    service: WorkerService
    engine: EchoEngine  # the worker's engine, unless the test gave it another
    channel: grpc.aio.Channel  # presenting the gateway's certificate
    stub: worker_pb2_grpc.WorkerStub
    sealing: GatewaySealing

    def work(
        self, text: str, *, tenant: str = "acme", max_tokens: int = 4096
    ) -> tuple[worker_pb2.WorkerRequest, Opener]:
        """The worker request for one user message, sealed as the gateway seals it, and its opener."""
        request = pb.GenerateRequest(
            request_id=f"req-{next(_ids)}",
            model="echo",
            messages=[pb.ChatMessage(role="user", content=text)],
            params=pb.SamplingParams(max_tokens=max_tokens),
        )
        spec = validate_request(request, LIMITS, request.request_id)
        work = worker_pb2.WorkerRequest(tenant=tenant)
        work.request.request_id, work.request.model = spec.request_id, "echo"
        work.request.params.CopyFrom(spec.sampling.to_proto())
        opener = self.sealing.seal("acme", spec, request, work.request)
        assert opener is not None
        return work, opener


def gateway_credentials(pki: DevPki) -> grpc.ChannelCredentials:
    """A client's TLS credentials presenting the gateway's certificate (what a worker admits)."""
    return grpc.ssl_channel_credentials(
        pki.ca_cert.read_bytes(), pki.gateway_key.read_bytes(), pki.gateway_cert.read_bytes()
    )


def words(n: int, prefix: str = "w") -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


@asynccontextmanager
async def served_worker(
    tmp_path: Path,
    tokens_per_second: float = 0.0,
    *,
    engine: Engine | None = None,
    max_message_bytes: int = 4 << 20,
) -> AsyncIterator[Served]:
    pki = ensure_dev_pki(tmp_path / "pki")
    attest = worker_attestation_cert(pki, "acme")
    attestor = WorkerAttestor(tenant="acme", model="echo", settings={}, model_manifest=b"echo",
                              attest_key=attest.key, attest_cert=attest.cert, nvidia=False)  # fmt: skip
    echo = EchoEngine(tokens_per_second)
    service = WorkerService(
        "acme", "echo", engine or echo, LIMITS, attestor, max_message_bytes=max_message_bytes
    )
    server, port, _ = await create_server(service, "127.0.0.1:0", WorkerTls(pki.worker_cert, pki.worker_key,
                                                                              pki.ca_cert))  # fmt: skip
    await server.start()
    channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", gateway_credentials(pki))
    stub = worker_pb2_grpc.WorkerStub(channel)
    keystore = open_keystore(KeysConfig(), tmp_path)
    ensure_tenant_keys(keystore, ["acme"])
    sealing = GatewaySealing(
        keystore, ca_pem=pki.attest_ca_cert.read_bytes(), policy_for=lambda _t: AttestationPolicy(),
        audit=AuditLog(None),
    )  # fmt: skip
    await sealing.ensure_released("acme", "echo", stub)
    try:
        yield Served(pki, f"127.0.0.1:{port}", service, echo, channel, stub, sealing)
    finally:
        await channel.close()
        await server.stop(None)
