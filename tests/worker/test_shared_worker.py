"""A shared worker's settings, its per-tenant attestation identities and measured configuration,
its service refusing tenants it doesn't serve, and the gateway's key release to it (in process: the
e2e tests run it for real)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from airlock.attestation import AttestationPolicy, verify
from airlock.errors import AttestationError, InvalidRequestError, PermissionDeniedError
from airlock.types import Limits
from airlock.v1 import worker_pb2
from control.pki import DevPki, ensure_dev_pki, worker_attestation_cert
from serving.settings import DomainSettings, SettingsError, TenantIdentity, TlsFiles, WorkerSettings
from worker.engines.echo import EchoEngine
from worker.main import build_attestors, zeroes_kv_per_request
from worker.server import WorkerService


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return ensure_dev_pki(tmp_path_factory.mktemp("pki"))


def settings(pki: DevPki, tenants: list[str], scrub: str = "request", isolation: str = "") -> WorkerSettings:
    identities = []
    for tenant in tenants:
        attest = worker_attestation_cert(pki, tenant)
        identities.append(TenantIdentity(tenant, attest.cert, attest.key))
    isolation = isolation or ("shared" if len(tenants) > 1 else "dedicated")
    return WorkerSettings(
        tuple(identities), "echo", TlsFiles(Path("c"), Path("k"), Path("ca")), Path("/tmp"), engine="echo",
        isolation=isolation, domain=DomainSettings(scrub=scrub),
    )  # fmt: skip


def test_a_shared_worker_names_every_tenant_with_its_own_identity(pki: DevPki) -> None:
    shared = settings(pki, ["acme", "globex"], "tenant-switch")
    assert shared.tenant_names == ("acme", "globex") and shared.isolation == "shared"
    assert shared.tenants[1].attest_cert.name == "globex.crt"
    assert zeroes_kv_per_request(shared)  # whatever the scrub mode says for dedicated workers
    dedicated = settings(pki, ["acme"], "tenant-switch")
    assert dedicated.tenant_names == ("acme",) and not zeroes_kv_per_request(dedicated)


@pytest.mark.parametrize(
    ("tenants", "scrub", "isolation", "message"),
    [
        (["acme", "globex"], "request", "dedicated", 'needs isolation "shared"'),
        (["acme", "acme"], "request", "shared", "named twice"),
        (["acme", "globex"], "off", "shared", "zeroes state between tenants"),
    ],
)
def test_nonsense_settings_are_refused(
    pki: DevPki, tenants: list[str], scrub: str, isolation: str, message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        settings(pki, tenants, scrub, isolation)


def test_each_tenants_evidence_is_signed_by_its_own_key_and_shows_the_shared_configuration(
    pki: DevPki,
) -> None:
    shared = build_attestors(settings(pki, ["globex", "acme"]), b"echo")
    dedicated = build_attestors(settings(pki, ["acme"]), b"echo")["acme"]
    ca = pki.attest_ca_cert.read_bytes()
    nonce = os.urandom(32)
    for tenant, attestor in shared.items():
        evidence = attestor.evidence(nonce)
        verified = verify(evidence, ca_pem=ca, nonce=nonce, tenant=tenant, policy=AttestationPolicy())
        statement = json.loads(evidence.statement)
        assert verified.tenant == tenant and statement["isolation"] == "shared"
        assert statement["tenants"] == ["acme", "globex"]
        other = "acme" if tenant == "globex" else "globex"
        with pytest.raises(AttestationError) as err:  # never passes for the other tenant's worker
            verify(evidence, ca_pem=ca, nonce=nonce, tenant=other, policy=AttestationPolicy())
        assert err.value.reason == "ATTESTATION_WRONG_TENANT"
    assert shared["acme"].hpke.worker_id != shared["globex"].hpke.worker_id
    # The configuration measurement covers isolation and the tenant set: a policy can pin it.
    assert shared["acme"].measurements["config"] == shared["globex"].measurements["config"]
    assert shared["acme"].measurements["config"] != dedicated.measurements["config"]
    three = build_attestors(settings(pki, ["acme", "globex", "initech"]), b"echo")
    assert three["acme"].measurements["config"] != shared["acme"].measurements["config"]
    assert json.loads(dedicated.evidence(nonce).statement)["isolation"] == "dedicated"


async def test_the_service_keeps_tenants_apart(pki: DevPki) -> None:
    attestors = build_attestors(settings(pki, ["acme", "globex"]), b"echo")
    acme = attestors.pop("acme")
    service = WorkerService(
        "acme", "echo", EchoEngine(), Limits(), acme, others=attestors, isolation="shared"
    )
    nonce = os.urandom(32)
    evidence = await service.GetEvidence(worker_pb2.EvidenceRequest(nonce=nonce, tenant="globex"), None)  # type: ignore[arg-type]
    assert json.loads(evidence.statement)["tenant"] == "globex"
    with pytest.raises(InvalidRequestError):  # a shared worker must be told whose evidence
        await service.GetEvidence(worker_pb2.EvidenceRequest(nonce=nonce), None)  # type: ignore[arg-type]
    with pytest.raises(PermissionDeniedError):
        await service.GetEvidence(worker_pb2.EvidenceRequest(nonce=nonce, tenant="initech"), None)  # type: ignore[arg-type]
    with pytest.raises(AttestationError) as err:
        await service.ReleaseKeys(worker_pb2.KeyRelease(tenant="initech"), None)  # type: ignore[arg-type]
    assert err.value.reason == "KEY_WRONG_TENANT"
    with pytest.raises(PermissionDeniedError):
        await service.Generate(worker_pb2.WorkerRequest(tenant="initech"), None)  # type: ignore[arg-type]
    info = await service.Info(worker_pb2.WorkerInfoRequest(), None)  # type: ignore[arg-type]
    assert sorted(info.tenants) == ["acme", "globex"] and info.isolation == "shared"
    with pytest.raises(ValueError, match="own tenant"):
        WorkerService("acme", "echo", EchoEngine(), Limits(), acme, others={"initech": attestors["globex"]})


def test_dedicated_evidence_needs_no_tenant_name(pki: DevPki, tmp_path: Path) -> None:
    attestor = build_attestors(settings(pki, ["acme"]), b"echo")["acme"]
    service = WorkerService("acme", "echo", EchoEngine(), Limits(), attestor)
    import asyncio

    reply = asyncio.run(service.GetEvidence(worker_pb2.EvidenceRequest(nonce=os.urandom(32)), None))  # type: ignore[arg-type]
    assert json.loads(reply.statement)["tenant"] == "acme"


class _FakeWorkerStub:
    """The gateway's view of a worker: evidence on request, and whatever keys it is sent."""

    def __init__(self, service: WorkerService) -> None:
        self.service = service
        self.released: list[str] = []

    async def GetEvidence(self, request: worker_pb2.EvidenceRequest, timeout: float) -> object:
        return await self.service.GetEvidence(request, None)  # type: ignore[arg-type]

    async def ReleaseKeys(self, request: worker_pb2.KeyRelease, timeout: float) -> object:
        self.released.append(request.tenant)
        return await self.service.ReleaseKeys(request, None)  # type: ignore[arg-type]


async def test_the_gateway_releases_no_key_to_a_shared_worker_for_a_tenant_not_opted_in(
    pki: DevPki, tmp_path: Path
) -> None:
    """Whatever the routes say: the worker's own signed statement says it is shared."""
    from gateway.audit import AuditLog
    from gateway.config import KeysConfig
    from gateway.keys import ensure_tenant_keys, open_keystore
    from gateway.sealing import GatewaySealing

    keystore = open_keystore(KeysConfig(), tmp_path)
    ensure_tenant_keys(keystore, ["acme", "globex"])
    attestors = build_attestors(settings(pki, ["acme", "globex"]), b"echo")
    acme = attestors.pop("acme")
    stub = _FakeWorkerStub(WorkerService("acme", "echo", EchoEngine(), Limits(), acme, others=attestors,
                                         isolation="shared"))  # fmt: skip
    audit = AuditLog(tmp_path / "audit.jsonl")
    sealing = GatewaySealing(
        keystore, ca_pem=pki.attest_ca_cert.read_bytes(), audit=audit,
        policy_for=lambda _t: AttestationPolicy(), may_share=lambda t: t == "acme",
    )  # fmt: skip
    with pytest.raises(AttestationError) as err:
        await sealing.ensure_released("globex", "echo", stub)  # type: ignore[arg-type]
    assert err.value.reason == "ISOLATION_NOT_ALLOWED" and stub.released == []
    await sealing.ensure_released("acme", "echo", stub)  # type: ignore[arg-type]
    assert stub.released == ["acme"] and acme.keys
    audit.close()
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    refused = [r for r in records if r.get("event") == "attestation"]
    assert refused[-1]["tenant"] == "globex" and refused[-1]["reason"] == "ISOLATION_NOT_ALLOWED"
