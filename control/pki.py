"""Development PKI made on first start: a CA, TLS certificates and the JWT signing key with its JWKS.

Production deployments bring their own CA and issuer; these files only make a laptop or CI stack
real (real TLS, real signatures) without any setup. Private keys are written mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from jwt.algorithms import OKPAlgorithm

__all__ = [
    "DevPki",
    "ServiceCert",
    "ensure_dev_pki",
    "existing_dev_pki",
    "issue_service_cert",
    "worker_attestation_cert",
]

GATEWAY_NAME = "airlock-gateway"
WORKER_NAME = "airlock-worker"
_VALID_DAYS = 365


@dataclass(frozen=True)
class DevPki:
    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def gateway_cert(self) -> Path:
        return self.dir / "gateway.crt"

    @property
    def gateway_key(self) -> Path:
        return self.dir / "gateway.key"

    @property
    def worker_cert(self) -> Path:
        return self.dir / "worker.crt"

    @property
    def worker_key(self) -> Path:
        return self.dir / "worker.key"

    @property
    def service_ca_cert(self) -> Path:
        """The CA of service (mTLS client) identities: separate from the one workers and gateway use."""
        return self.dir / "service-ca.crt"

    @property
    def service_ca_key(self) -> Path:
        return self.dir / "service-ca.key"

    @property
    def attest_ca_cert(self) -> Path:
        """The CA of worker attestation identities: separate from the TLS CA, so the gateway's own
        certificate can never pass for a worker's (give clients this one as `worker_ca`)."""
        return self.dir / "attest-ca.crt"

    @property
    def attest_ca_key(self) -> Path:
        return self.dir / "attest-ca.key"

    @property
    def jwt_key(self) -> Path:
        return self.dir / "jwt-signing.key"

    @property
    def jwks(self) -> Path:
        return self.dir / "jwks.json"

    @property
    def audit_key(self) -> Path:
        """Signs the audit trail's chain heads (Ed25519)."""
        return self.dir / "audit-signing.key"

    @property
    def audit_pub(self) -> Path:
        return self.dir / "audit-signing.pub"

    @property
    def bundle_key(self) -> Path:
        """Signs model bundles in development (the converted bundled model)."""
        return self.dir / "bundle-signing.key"

    @property
    def bundle_trusted(self) -> Path:
        """The trusted-keys file workers check bundle signatures against (public keys, PEM)."""
        return self.dir / "bundle-trusted.pem"

    @property
    def jwt_kid(self) -> str:
        return str(json.loads(self.jwks.read_text())["keys"][0]["kid"])


def existing_dev_pki(state_dir: Path) -> DevPki | None:
    """The dev PKI under `state_dir/pki` if `airlock up` made one there; None otherwise (nothing made)."""
    pki = DevPki(state_dir / "pki")
    needed = (pki.ca_cert, pki.ca_key, pki.jwt_key, pki.jwks, pki.service_ca_cert, pki.service_ca_key)
    return pki if all(path.is_file() for path in needed) else None


def ensure_dev_pki(state_dir: Path) -> DevPki:
    """Create whatever part of the dev PKI is missing under `state_dir/pki`; return its paths."""
    pki = DevPki(state_dir / "pki")
    pki.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(pki.dir, 0o700)
    if not (pki.ca_cert.exists() and pki.ca_key.exists()):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        _write_key(pki.ca_key, ca_key)
        _write_public(pki.ca_cert, _ca_certificate(ca_key, "Airlock development CA"))
        for stale in (pki.gateway_cert, pki.worker_cert):
            stale.unlink(missing_ok=True)  # leaf certificates of an old CA are useless
    if not (pki.service_ca_cert.exists() and pki.service_ca_key.exists()):
        service_key = ec.generate_private_key(ec.SECP256R1())
        _write_key(pki.service_ca_key, service_key)
        _write_public(pki.service_ca_cert, _ca_certificate(service_key, "Airlock development service CA"))
    if not (pki.attest_ca_cert.exists() and pki.attest_ca_key.exists()):
        attest_key = ec.generate_private_key(ec.SECP256R1())
        _write_key(pki.attest_ca_key, attest_key)
        _write_public(pki.attest_ca_cert, _ca_certificate(attest_key, "Airlock development attestation CA"))
    ca_key = _load_ec_key(pki.ca_key)
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    for name, cert, key in (
        (GATEWAY_NAME, pki.gateway_cert, pki.gateway_key),
        (WORKER_NAME, pki.worker_cert, pki.worker_key),
    ):
        if not (cert.exists() and key.exists()):
            leaf_key = ec.generate_private_key(ec.SECP256R1())
            _write_key(key, leaf_key)
            _write_public(cert, _leaf_certificate(name, leaf_key, ca_key, ca_cert))
    if not (pki.jwt_key.exists() and pki.jwks.exists()):
        signing = ed25519.Ed25519PrivateKey.generate()
        _write_key(pki.jwt_key, signing)
        jwk = json.loads(OKPAlgorithm.to_jwk(signing.public_key()))
        raw = signing.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        jwk.update(kid=f"dev-{raw.hex()[:16]}", alg="EdDSA", use="sig")
        _write_public(pki.jwks, json.dumps({"keys": [jwk]}, indent=2).encode())
    for private, public in ((pki.audit_key, pki.audit_pub), (pki.bundle_key, pki.bundle_trusted)):
        if not (private.exists() and public.exists()):
            pair = ed25519.Ed25519PrivateKey.generate()
            _write_key(private, pair)
            _write_public(public, pair.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ))  # fmt: skip
    return pki


@dataclass(frozen=True)
class ServiceCert:
    spiffe_id: str
    cert: Path
    key: Path


def issue_service_cert(
    pki: DevPki,
    *,
    tenant: str,
    service: str,
    trust_domain: str = "airlock.local",
    out_dir: Path | None = None,
    valid_days: int = 30,
) -> ServiceCert:
    """Issue a service identity (mTLS client certificate with a SPIFFE URI SAN) from the dev service CA."""
    spiffe_id = f"spiffe://{trust_domain}/tenant/{tenant}/svc/{service}"
    ca_key = _load_ec_key(pki.service_ca_key)
    ca_cert = x509.load_pem_x509_certificate(pki.service_ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf_certificate(
        f"svc {tenant}/{service}", key, ca_key, ca_cert,
        sans=[x509.UniformResourceIdentifier(spiffe_id)],
        usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
        valid_days=valid_days,
    )  # fmt: skip
    directory = out_dir or pki.dir / "services"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths = ServiceCert(
        spiffe_id, directory / f"{tenant}-{service}.crt", directory / f"{tenant}-{service}.key"
    )
    _write_key(paths.key, key)
    _write_public(paths.cert, cert)
    return paths


def worker_attestation_cert(pki: DevPki, tenant: str, trust_domain: str = "airlock.local") -> ServiceCert:
    """The key a tenant's workers sign evidence with, and its certificate from the attestation CA:
    SPIFFE ID `spiffe://TD/tenant/T/worker`, which verifiers match against the claimed tenant.
    Issued once per tenant (development; production issues them on the worker hosts)."""
    spiffe_id = f"spiffe://{trust_domain}/tenant/{tenant}/worker"
    directory = pki.dir / "attestation"
    paths = ServiceCert(spiffe_id, directory / f"{tenant}.crt", directory / f"{tenant}.key")
    if paths.cert.exists() and paths.key.exists():
        return paths
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf_certificate(
        f"worker attestation {tenant}", key, _load_ec_key(pki.attest_ca_key),
        x509.load_pem_x509_certificate(pki.attest_ca_cert.read_bytes()),
        sans=[x509.UniformResourceIdentifier(spiffe_id)], usages=[ExtendedKeyUsageOID.CODE_SIGNING],
    )  # fmt: skip
    _write_key(paths.key, key)
    _write_public(paths.cert, cert)
    return paths


def _load_ec_key(path: Path) -> ec.EllipticCurvePrivateKey:
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: not an EC private key")
    return loaded


def _ca_certificate(key: ec.EllipticCurvePrivateKey, common_name: str) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


_LOOPBACK_SANS: list[x509.GeneralName] = [
    x509.DNSName("localhost"),
    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    x509.IPAddress(ipaddress.ip_address("::1")),
]
_SERVER_AND_CLIENT = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]


def _leaf_certificate(
    common_name: str,
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    sans: list[x509.GeneralName] = _LOOPBACK_SANS,
    usages: list[x509.ObjectIdentifier] = _SERVER_AND_CLIENT,
    valid_days: int = _VALID_DAYS,
) -> bytes:
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o644)
