"""Evidence is accepted only when it is fresh, ours, for this tenant, strong enough and as expected;
HPKE seals to the attested key in both suites."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import pytest

from airlock.attestation import SUITES, AttestationPolicy, hpke_seal, key_release_info, sign_statement, verify
from airlock.errors import AttestationError
from airlock.v1 import worker_pb2
from control.pki import DevPki, ensure_dev_pki, worker_attestation_cert
from worker.attestation import WorkerAttestor

NONCE = os.urandom(32)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return ensure_dev_pki(tmp_path_factory.mktemp("pki"))


def attestor(pki: DevPki, suite: str = SUITES[0], tenant: str = "acme") -> WorkerAttestor:
    identity = worker_attestation_cert(pki, tenant)
    return WorkerAttestor(
        tenant=tenant, model="smollm2", settings={"model": "smollm2"}, model_manifest=b"manifest",
        attest_key=identity.key, attest_cert=identity.cert, suite=suite, nvidia=False,
    )  # fmt: skip


def check(pki: DevPki, evidence: object, policy: AttestationPolicy | None = None, **kw: object) -> str:
    options: dict[str, object] = {"ca_pem": pki.attest_ca_cert.read_bytes(), "nonce": NONCE, "tenant": "acme",
                                  "policy": policy or AttestationPolicy(suites=SUITES), **kw}  # fmt: skip
    try:
        verify(evidence, **options)  # type: ignore[arg-type]
    except AttestationError as exc:
        return exc.reason
    return "OK"


def test_good_evidence_verifies_with_the_workers_measurements(pki: DevPki) -> None:
    worker = attestor(pki)
    ca = pki.attest_ca_cert.read_bytes()
    verified = verify(
        worker.evidence(NONCE), ca_pem=ca, nonce=NONCE, tenant="acme", policy=AttestationPolicy()
    )
    assert verified.level == "software" and verified.worker_id == worker.hpke.worker_id
    assert verified.measurements == worker.measurements


def test_stale_or_replayed_evidence_is_refused(pki: DevPki) -> None:
    evidence = attestor(pki).evidence(os.urandom(32))  # someone else's nonce
    assert check(pki, evidence) == "ATTESTATION_STALE"
    old = attestor(pki).evidence(NONCE)
    assert check(pki, old, now=time.time() + 3600) == "ATTESTATION_STALE"


def test_evidence_from_another_ca_is_refused(pki: DevPki, tmp_path: Path) -> None:
    other = ensure_dev_pki(tmp_path)
    assert check(pki, attestor(other).evidence(NONCE)) == "ATTESTATION_UNTRUSTED"


def test_an_edited_statement_is_refused(pki: DevPki) -> None:
    evidence = attestor(pki).evidence(NONCE)
    statement = json.loads(evidence.statement)
    statement["level"] = "nvidia-cc"
    evidence.statement = json.dumps(statement).encode()
    assert check(pki, evidence) == "ATTESTATION_BAD_SIGNATURE"


def test_another_tenants_worker_is_refused(pki: DevPki) -> None:
    assert check(pki, attestor(pki, tenant="globex").evidence(NONCE)) == "ATTESTATION_WRONG_TENANT"


def test_software_evidence_does_not_meet_a_confidential_computing_policy(pki: DevPki) -> None:
    evidence = attestor(pki).evidence(NONCE)
    assert check(pki, evidence, AttestationPolicy(min_level="nvidia-cc")) == "ATTESTATION_INSUFFICIENT"


def test_a_claimed_cc_level_without_a_verified_nvidia_token_is_refused(pki: DevPki) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    statement = json.loads(attestor(pki).evidence(NONCE).statement)
    statement["level"] = "nvidia-cc"  # signed by a (compromised) worker key, but no NVIDIA proof
    identity = worker_attestation_cert(pki, "acme")
    key = load_pem_private_key(identity.key.read_bytes(), None)
    evidence = sign_statement(statement, key, identity.cert.read_bytes())  # type: ignore[arg-type]
    assert check(pki, evidence) == "ATTESTATION_INSUFFICIENT"


def test_measurements_must_be_allowed_when_listed(pki: DevPki) -> None:
    worker = attestor(pki)
    evidence = worker.evidence(NONCE)
    good = AttestationPolicy(measurements={"code": (worker.measurements["code"],)})
    assert check(pki, evidence, good) == "OK"
    bad = AttestationPolicy(measurements={"model": ("0" * 64,)})
    assert check(pki, evidence, bad) == "ATTESTATION_MEASUREMENT"


def test_a_swapped_hpke_key_is_refused(pki: DevPki) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    statement = json.loads(attestor(pki).evidence(NONCE).statement)
    statement["hpke_public_key"] = base64.b64encode(attestor(pki).hpke.public_bytes).decode()
    identity = worker_attestation_cert(pki, "acme")
    key = load_pem_private_key(identity.key.read_bytes(), None)
    evidence = sign_statement(statement, key, identity.cert.read_bytes())  # type: ignore[arg-type]
    assert check(pki, evidence) == "ATTESTATION_MALFORMED"


@pytest.mark.parametrize("suite", SUITES)
def test_keys_released_to_a_worker_open_only_there_and_only_once(pki: DevPki, suite: str) -> None:
    worker, other = attestor(pki, suite), attestor(pki, suite)
    worker.evidence(NONCE)  # the release answers this evidence
    keys = worker_pb2.TenantKeys(keys={"acme-k1": os.urandom(32)}, active_key_id="acme-k1")
    info = key_release_info("acme", worker.hpke.worker_id, NONCE)
    sealed = hpke_seal(suite, worker.hpke.public_bytes, keys.SerializeToString(), info)
    release = worker_pb2.KeyRelease(tenant="acme", worker_id=worker.hpke.worker_id, sealed_keys=sealed,
                                    nonce=NONCE)  # fmt: skip
    assert worker.release(release) == ["acme-k1"] and worker.key("acme-k1") == keys.keys["acme-k1"]
    with pytest.raises(AttestationError) as err:  # replaying a recorded release is refused
        worker.release(release)
    assert err.value.reason == "KEY_REPLAYED"
    with pytest.raises(AttestationError) as err:  # another worker's key opens nothing
        other.hpke.open(sealed, info)
    assert err.value.reason == "KEY_UNSEAL_FAILED"
    worker.evidence(NONCE)
    with pytest.raises(AttestationError):  # a release for another tenant is refused
        worker.release(worker_pb2.KeyRelease(tenant="globex", worker_id=worker.hpke.worker_id,
                                             sealed_keys=sealed, nonce=NONCE))  # fmt: skip
    with pytest.raises(AttestationError) as err:
        worker.key("acme-k2")
    assert err.value.reason == "KEYS_MISSING"


def test_the_gateways_own_certificate_cannot_pass_for_a_worker(pki: DevPki) -> None:
    """A gateway (or anything with a TLS certificate) signing a statement is refused: evidence must
    come from the attestation CA, under a worker identity of the claimed tenant."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    statement = json.loads(attestor(pki).evidence(NONCE).statement)
    key = load_pem_private_key(pki.gateway_key.read_bytes(), None)
    forged = sign_statement(statement, key, pki.gateway_cert.read_bytes())  # type: ignore[arg-type]
    assert check(pki, forged) == "ATTESTATION_UNTRUSTED"
    # Even verified against the TLS CA it would fail: no worker identity in the certificate.
    assert check(pki, forged, ca_pem=pki.ca_cert.read_bytes()) == "ATTESTATION_WRONG_TENANT"


def test_another_tenants_worker_key_cannot_sign_for_this_tenant(pki: DevPki) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    statement = json.loads(attestor(pki).evidence(NONCE).statement)  # claims tenant acme
    globex = worker_attestation_cert(pki, "globex")
    key = load_pem_private_key(globex.key.read_bytes(), None)
    forged = sign_statement(statement, key, globex.cert.read_bytes())  # type: ignore[arg-type]
    assert check(pki, forged) == "ATTESTATION_WRONG_TENANT"


def test_a_suite_the_verifier_did_not_choose_is_refused(pki: DevPki) -> None:
    evidence = attestor(pki, "x25519").evidence(NONCE)
    assert check(pki, evidence, AttestationPolicy()) == "ATTESTATION_SUITE"  # default: the hybrid only
    assert check(pki, evidence, AttestationPolicy(suites=("x25519",))) == "OK"
