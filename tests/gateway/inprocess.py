"""An in-process gateway wired as gateway/main.py wires it (real TLS, guard, admission, sealing and
audit), in front of an in-process echo worker for acme (model "echo"); globex's route is never
dialled. Tests subclass the servicer to watch what it gets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airlock.attestation import AttestationPolicy
from airlock.types import Limits
from control.pki import DevPki, ensure_dev_pki, worker_attestation_cert
from control.tokens import mint_dev_token
from gateway.admission import Admission
from gateway.audit import AuditLog
from gateway.auth.guard import CallGuard
from gateway.auth.identity import JwtVerifier, ServiceIdentity
from gateway.auth.lockout import Lockout
from gateway.call import Calls
from gateway.config import AuditConfig, AuthConfig, KeysConfig, LockoutConfig
from gateway.keys import ensure_tenant_keys, open_keystore
from gateway.metrics import Metrics
from gateway.pipeline import Pipeline
from gateway.policy.authz import Authorizer
from gateway.quota import MemoryQuotaStore, QuotaLimits
from gateway.sealing import GatewaySealing
from gateway.server import ClientTls, InferenceService, Route, Router, ServerTls, create_server
from tests.conftest import make_policy_dir
from worker.attestation import WorkerAttestor
from worker.engines.echo import EchoEngine
from worker.server import WorkerService, WorkerTls
from worker.server import create_server as create_worker_server

LIMITS = Limits(max_tokens=512, default_max_tokens=64)


@dataclass
class Site:
    pki: DevPki
    address: str
    service: InferenceService
    worker: WorkerService
    metrics: Metrics
    audit_path: Path
    auth: AuthConfig

    def token(self, tenant: str = "acme", subject: str = "tester", ttl_seconds: int = 300) -> str:
        return mint_dev_token(self.pki, self.auth, tenant=tenant, subject=subject, ttl_seconds=ttl_seconds)

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        lines = self.audit_path.read_text().splitlines() if self.audit_path.exists() else []
        return [r for r in map(json.loads, lines) if event is None or r["event"] == event]


@asynccontextmanager
async def gateway_site(
    tmp_path: Path,
    service_class: type[InferenceService] = InferenceService,
    audit_config: AuditConfig | None = None,
) -> AsyncIterator[Site]:
    pki = ensure_dev_pki(tmp_path / "pki")
    metrics, auth = Metrics(), AuthConfig()
    audit_path = tmp_path / "audit.jsonl"
    audit = AuditLog(audit_path, config=audit_config)
    authorizer = Authorizer.from_directory(make_policy_dir(tmp_path / "policy"), metrics=metrics, audit=audit)

    attest = worker_attestation_cert(pki, "acme")
    attestor = WorkerAttestor(tenant="acme", model="echo", settings={}, model_manifest=b"echo",
                              attest_key=attest.key, attest_cert=attest.cert, nvidia=False)  # fmt: skip
    worker = WorkerService("acme", "echo", EchoEngine(), LIMITS, attestor)
    worker_server, worker_port, _ = await create_worker_server(
        worker, "127.0.0.1:0", WorkerTls(pki.worker_cert, pki.worker_key, pki.ca_cert)
    )
    routes = [
        Route("acme", "echo", "echo", f"127.0.0.1:{worker_port}"),
        Route("globex", "echo", "echo", "127.0.0.1:9"),
    ]
    router = Router(routes, ClientTls(pki.ca_cert, pki.gateway_cert, pki.gateway_key), audit=audit)

    def quota_for(tenant: str) -> QuotaLimits | None:
        settings = authorizer.policy.tenants.get(tenant)
        return settings.quota if settings is not None else None

    keystore = open_keystore(KeysConfig(), tmp_path)
    ensure_tenant_keys(keystore, ["acme", "globex"])
    sealing = GatewaySealing(keystore, ca_pem=pki.attest_ca_cert.read_bytes(),
                             policy_for=lambda _tenant: AttestationPolicy(), audit=audit)  # fmt: skip
    admission = Admission(MemoryQuotaStore(), quota_for, metrics=metrics, audit=audit)
    pipeline = Pipeline(router, authorizer, admission=admission, sealing=sealing, audit=audit)
    service = service_class(pipeline)
    guard = CallGuard(
        JwtVerifier(auth, {"airlock-dev": pki.jwks}, lambda _iss, t: t in authorizer.policy.tenants),
        ServiceIdentity("airlock.local"), authorizer, Lockout(LockoutConfig(max_failures=0)),
        Calls(router, LIMITS, quota_for=admission.limits_for, refused=admission.refused),
        gate=admission.gate, metrics=metrics, audit=audit,
    )  # fmt: skip
    server, port, _, _ = create_server(
        service, guard, "127.0.0.1:0",
        tls=ServerTls(pki.gateway_cert, pki.gateway_key, pki.service_ca_cert), max_message_bytes=1 << 20,
    )  # fmt: skip
    await worker_server.start()
    await server.start()
    try:
        yield Site(pki, f"127.0.0.1:{port}", service, worker, metrics, audit_path, auth)
    finally:
        await server.stop(None)
        await worker_server.stop(None)
        await router.close()
        audit.close()
