"""Evidence of what a worker runs, how it is checked, and HPKE sealing to the worker's key.

A worker's evidence is a JSON *statement* signed with its tenant's worker attestation key, whose
certificate comes from the deployment's *attestation* CA (not the TLS CA: the gateway's own
certificate must never pass for a worker's) and names `spiffe://TD/tenant/T/worker`:

    {"version": 1, "level": "software" | "nvidia-cc", "tenant": ..., "model": ...,
     "measurements": {"code": sha256, "config": sha256, "model": sha256},
     "hpke_suite": "mlkem768-x25519" | "x25519", "hpke_public_key": base64,
     "worker_id": sha256 of the HPKE public key, "nonce": base64 (the verifier's), "issued_at": unix time}

`software` is the weaker level: the worker vouches for its own measurements with a key the
deployment issued; it proves which worker of this deployment answers and what it says it runs, not
that the host is honest. `nvidia-cc` adds the GPUs' own confidential-computing evidence, bound to the
same nonce, which the verifier checks itself with NVIDIA's local verifier (`nv-attestation-sdk`, the
`gpu` extra; without it that level never verifies). Verification (`verify`) is shared by the gateway
(before releasing a tenant's key) and the SDK (before sealing end to end).

HPKE (RFC 9180) seals small secrets (tenant keys, end-to-end request keys) to the worker's attested
public key: DHKEM(X25519) or the post-quantum hybrid ML-KEM-768 + X25519, with HKDF-SHA256 and
AES-256-GCM, from `cryptography`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric import ec, mlkem, x25519

from airlock.errors import AttestationError
from airlock.v1 import inference_pb2 as pb

__all__ = [
    "LEVELS",
    "SUITES",
    "AttestationPolicy",
    "HpkeKey",
    "Verified",
    "gpu_nonce",
    "hpke_seal",
    "key_release_info",
    "sign_statement",
    "verify",
    "verify_nvidia_evidence",
]

LEVELS = ("software", "nvidia-cc")  # weakest first
SUITES = ("mlkem768-x25519", "x25519")  # preferred first
MAX_AGE_SECONDS = 300.0
_X25519_BYTES = 32


def _suite(name: str) -> hpke.Suite:
    kem = {"x25519": hpke.KEM.X25519, "mlkem768-x25519": hpke.KEM.MLKEM768_X25519}.get(name)
    if kem is None:
        raise AttestationError(f"unknown HPKE suite {name!r}", reason="ATTESTATION_BAD_SUITE")
    return hpke.Suite(kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


class HpkeKey:
    """A worker's ephemeral HPKE key pair; the private half never leaves the process."""

    def __init__(self, suite: str = SUITES[0]) -> None:
        _suite(suite)
        self.suite = suite
        self._x25519 = x25519.X25519PrivateKey.generate()
        self._mlkem = mlkem.MLKEM768PrivateKey.generate() if suite == "mlkem768-x25519" else None

    @property
    def public_bytes(self) -> bytes:
        x = self._x25519.public_key().public_bytes_raw()
        return (self._mlkem.public_key().public_bytes_raw() + x) if self._mlkem else x

    @property
    def worker_id(self) -> str:
        return hashlib.sha256(self.public_bytes).hexdigest()

    def open(self, ciphertext: bytes, info: bytes) -> bytes:
        private: Any = (
            hpke.MLKEM768X25519PrivateKey(self._mlkem, self._x25519) if self._mlkem else self._x25519
        )
        try:
            return _suite(self.suite).decrypt(ciphertext, private, info=info)
        except Exception:  # any failure is the same to the caller: not for this key
            raise AttestationError("sealed key does not open with this worker's key",
                                   reason="KEY_UNSEAL_FAILED") from None  # fmt: skip


def _public_key(suite: str, raw: bytes) -> Any:
    try:
        if suite == "x25519":
            return x25519.X25519PublicKey.from_public_bytes(raw)
        kem, x = raw[:-_X25519_BYTES], raw[-_X25519_BYTES:]
        return hpke.MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(kem), x25519.X25519PublicKey.from_public_bytes(x)
        )
    except ValueError:
        raise AttestationError("evidence has a malformed HPKE key", reason="ATTESTATION_BAD_KEY") from None


def key_release_info(tenant: str, worker_id: str, nonce: bytes) -> bytes:
    """HPKE `info` for a key release: binds the sealed keys to one tenant, one worker key and the
    attestation (nonce) they answer, so a recorded release can't be replayed to the worker."""
    return b"airlock/v1/key-release|" + tenant.encode() + b"|" + worker_id.encode() + b"|" + nonce


def hpke_seal(suite: str, public_key: bytes, plaintext: bytes, info: bytes) -> bytes:
    """Seal `plaintext` so that only the holder of `public_key`'s private half can open it."""
    return _suite(suite).encrypt(plaintext, _public_key(suite, public_key), info=info)


def sign_statement(
    statement: Mapping[str, Any], key: ec.EllipticCurvePrivateKey, cert_pem: bytes
) -> pb.Evidence:
    body = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()
    return pb.Evidence(
        statement=body, signature=key.sign(body, ec.ECDSA(hashes.SHA256())), certificate=cert_pem
    )


@dataclass(frozen=True)
class AttestationPolicy:
    """What a verifier accepts: a minimum level and, per measurement, allowed sha256 values
    (a measurement not listed is not checked)."""

    min_level: str = "software"
    measurements: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    max_age_seconds: float = MAX_AGE_SECONDS
    suites: tuple[str, ...] = (SUITES[0],)  # HPKE suites accepted: post-quantum hybrid only by default

    def __post_init__(self) -> None:
        if self.min_level not in LEVELS:
            raise ValueError(f"min_level must be one of {', '.join(LEVELS)}")
        if not self.suites or set(self.suites) - set(SUITES):
            raise ValueError(f"suites must be some of {', '.join(SUITES)}")


@dataclass(frozen=True)
class Verified:
    """Evidence that passed: what the verifier may rely on."""

    level: str
    tenant: str
    model: str
    measurements: Mapping[str, str]
    hpke_suite: str
    hpke_public_key: bytes
    worker_id: str
    isolation: str = "dedicated"  # "shared": the worker serves several tenants (docs/isolation.md)


def gpu_nonce(nonce: bytes, worker_id: str) -> bytes:
    """The nonce the GPUs attest to: the verifier's nonce bound to the worker's HPKE key, so GPU
    evidence fetched for the same nonce elsewhere can't be attached to another worker's statement."""
    return hashlib.sha256(b"airlock/v1/gpu|" + nonce + b"|" + worker_id.encode()).digest()


def _worker_identity(cert: x509.Certificate) -> str | None:
    """The tenant of a worker attestation certificate (`spiffe://TD/tenant/T/worker`), or None."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        return None
    scheme, _, rest = uris[0].partition("://")
    parts = rest.split("/")
    if scheme != "spiffe" or len(parts) != 4 or parts[1] != "tenant" or parts[3] != "worker" or not parts[2]:
        return None
    return parts[2]


def verify_nvidia_evidence(evidence_json: str, nonce: bytes) -> bool:
    """Check NVIDIA GPU evidence here with NVIDIA's local verifier (signatures up to NVIDIA's root,
    measurements against the reference values, the nonce). Air-gapped sites point the SDK's RIM and
    OCSP settings at local mirrors. Fails closed: no SDK, bad input or any error is False."""
    try:
        from nv_attestation_sdk import attestation as nv  # type: ignore[import-not-found]
    except ImportError:
        return False
    try:
        evidence = json.loads(evidence_json)
        client = nv.Attestation()
        client.set_name("airlock-verifier")
        client.set_nonce(nonce.hex())
        client.add_verifier(nv.Devices.GPU, nv.Environment.LOCAL, "", "")
        return bool(evidence) and bool(client.attest(evidence))
    except Exception:
        return False


def _refuse(message: str, reason: str) -> AttestationError:
    return AttestationError(message, reason=reason)


def verify(
    evidence: pb.Evidence,
    *,
    ca_pem: bytes,
    nonce: bytes,
    tenant: str,
    policy: AttestationPolicy,
    now: float | None = None,
    verify_nvidia: Any = verify_nvidia_evidence,
) -> Verified:
    """Check evidence: certificate from our CA and in date, signature, our nonce, the tenant, fresh,
    level at least the policy's, allowed measurements, HPKE key bound to the worker id.
    `verify_nvidia(evidence_json, nonce) -> bool` checks the GPUs' evidence for level `nvidia-cc`."""
    now = time.time() if now is None else now
    try:
        cert = x509.load_pem_x509_certificate(evidence.certificate)
        ca = x509.load_pem_x509_certificate(ca_pem)
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise _refuse(
            "evidence certificate is not from the attestation CA", "ATTESTATION_UNTRUSTED"
        ) from None
    if _worker_identity(cert) != tenant:
        raise _refuse(
            "evidence certificate is not a worker identity of this tenant", "ATTESTATION_WRONG_TENANT"
        )
    if not cert.not_valid_before_utc.timestamp() <= now <= cert.not_valid_after_utc.timestamp():
        raise _refuse("evidence certificate is not valid now", "ATTESTATION_UNTRUSTED")
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise _refuse("evidence certificate has an unexpected key type", "ATTESTATION_UNTRUSTED")
    try:
        public.verify(evidence.signature, evidence.statement, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise _refuse("evidence signature does not verify", "ATTESTATION_BAD_SIGNATURE") from None
    try:
        s = json.loads(evidence.statement)
        claimed_nonce = base64.b64decode(s["nonce"], validate=True)
        public_key = base64.b64decode(s["hpke_public_key"], validate=True)
        level, suite, worker_id = str(s["level"]), str(s["hpke_suite"]), str(s["worker_id"])
        issued, measurements = float(s["issued_at"]), dict(s["measurements"])
        claimed_tenant, model = str(s["tenant"]), str(s["model"])
        isolation = str(s.get("isolation", "dedicated"))
    except (ValueError, KeyError, TypeError):
        raise _refuse("evidence statement is malformed", "ATTESTATION_MALFORMED") from None
    if claimed_nonce != nonce:
        raise _refuse("evidence is not bound to this nonce (stale or replayed)", "ATTESTATION_STALE")
    if not math.isfinite(issued) or abs(now - issued) > policy.max_age_seconds:
        raise _refuse("evidence is too old", "ATTESTATION_STALE")
    if claimed_tenant != tenant:
        raise _refuse("evidence is from another tenant's worker", "ATTESTATION_WRONG_TENANT")
    if hashlib.sha256(public_key).hexdigest() != worker_id:
        raise _refuse("evidence HPKE key does not match its worker id", "ATTESTATION_MALFORMED")
    if suite not in policy.suites:
        raise _refuse(f"HPKE suite {suite} is not accepted here", "ATTESTATION_SUITE")
    _public_key(suite, public_key)
    if level not in LEVELS:
        raise _refuse(f"unknown evidence level {level!r}", "ATTESTATION_MALFORMED")
    if level == "nvidia-cc" and not verify_nvidia(evidence.nvidia_evidence, gpu_nonce(nonce, worker_id)):
        raise _refuse("NVIDIA confidential-computing evidence did not verify", "ATTESTATION_INSUFFICIENT")
    if LEVELS.index(level) < LEVELS.index(policy.min_level):
        raise _refuse(f"evidence level {level} is below the required {policy.min_level}",
                      "ATTESTATION_INSUFFICIENT")  # fmt: skip
    for name, allowed in policy.measurements.items():  # a listed measurement with no values allows none
        if measurements.get(name) not in allowed:
            raise _refuse(f"measurement {name!r} is not an allowed value", "ATTESTATION_MEASUREMENT")
    return Verified(level, claimed_tenant, model, measurements, suite, public_key, worker_id, isolation)
