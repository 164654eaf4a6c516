"""`ensure_dev_pki`: a CA, leaf certificates it issued, a JWT key with a public-only JWKS; made once."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from control.pki import DevPki, ensure_dev_pki


def files(pki: DevPki) -> dict[str, Path]:
    return {
        "ca_cert": pki.ca_cert,
        "ca_key": pki.ca_key,
        "gateway_cert": pki.gateway_cert,
        "gateway_key": pki.gateway_key,
        "worker_cert": pki.worker_cert,
        "worker_key": pki.worker_key,
        "jwt_key": pki.jwt_key,
        "jwks": pki.jwks,
        "service_ca_cert": pki.service_ca_cert,
        "service_ca_key": pki.service_ca_key,
        "attest_ca_cert": pki.attest_ca_cert,
        "attest_ca_key": pki.attest_ca_key,
        "audit_key": pki.audit_key,
        "audit_pub": pki.audit_pub,
        "bundle_key": pki.bundle_key,
        "bundle_trusted": pki.bundle_trusted,
    }


def snapshot(pki: DevPki) -> dict[str, tuple[bytes, int]]:
    return {name: (p.read_bytes(), p.stat().st_mtime_ns) for name, p in files(pki).items()}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def pki(tmp_path: Path) -> DevPki:
    return ensure_dev_pki(tmp_path)


def test_every_file_is_made_under_state_dir_pki(tmp_path: Path, pki: DevPki) -> None:
    assert pki.dir == tmp_path / "pki"
    assert sorted(p.name for p in pki.dir.iterdir()) == sorted(p.name for p in files(pki).values())


def test_private_keys_are_owner_only_and_the_directory_is_private(pki: DevPki) -> None:
    assert mode(pki.dir) == 0o700
    keys = (pki.ca_key, pki.gateway_key, pki.worker_key, pki.jwt_key, pki.service_ca_key, pki.audit_key,
            pki.bundle_key, pki.attest_ca_key)  # fmt: skip
    for key in keys:
        assert mode(key) == 0o600, key.name


def test_an_existing_open_directory_is_tightened(tmp_path: Path) -> None:
    (tmp_path / "pki").mkdir(mode=0o755)
    (tmp_path / "pki").chmod(0o755)
    assert mode(ensure_dev_pki(tmp_path).dir) == 0o700


def test_a_second_call_changes_nothing(tmp_path: Path, pki: DevPki) -> None:
    before = snapshot(pki)
    again = ensure_dev_pki(tmp_path)
    assert again == pki
    assert snapshot(again) == before


def test_a_missing_leaf_is_remade_alone(tmp_path: Path, pki: DevPki) -> None:
    before = snapshot(pki)
    pki.worker_cert.unlink()
    ensure_dev_pki(tmp_path)
    after = snapshot(pki)
    assert after["worker_cert"] != before["worker_cert"]
    assert after["worker_key"] != before["worker_key"]  # a new key goes with a new certificate
    for name in ("ca_cert", "ca_key", "gateway_cert", "gateway_key", "jwt_key", "jwks"):
        assert after[name] == before[name], name
    cert(pki.worker_cert).verify_directly_issued_by(cert(pki.ca_cert))


def test_a_new_ca_reissues_the_leaves(tmp_path: Path, pki: DevPki) -> None:
    old_ca = cert(pki.ca_cert)
    pki.ca_key.unlink()
    ensure_dev_pki(tmp_path)
    new_ca = cert(pki.ca_cert)
    assert new_ca.public_key() != old_ca.public_key()
    for leaf in (pki.gateway_cert, pki.worker_cert):
        cert(leaf).verify_directly_issued_by(new_ca)
        with pytest.raises(InvalidSignature):
            cert(leaf).verify_directly_issued_by(old_ca)


def test_the_ca_is_a_ca(pki: DevPki) -> None:
    ca = cert(pki.ca_cert)
    ca.verify_directly_issued_by(ca)  # self-signed
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign


@pytest.mark.parametrize(
    ("name", "common_name"), [("gateway", "airlock-gateway"), ("worker", "airlock-worker")]
)
def test_leaf_certificates_are_issued_by_the_ca(pki: DevPki, name: str, common_name: str) -> None:
    leaf = cert(getattr(pki, f"{name}_cert"))
    leaf.verify_directly_issued_by(cert(pki.ca_cert))
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == common_name
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)
    now = dt.datetime.now(dt.UTC)
    assert leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc


@pytest.mark.parametrize("name", ["gateway", "worker"])
def test_leaf_names_cover_local_addresses(pki: DevPki, name: str) -> None:
    san = (
        cert(getattr(pki, f"{name}_cert"))
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)


@pytest.mark.parametrize("name", ["gateway", "worker"])
def test_each_leaf_key_matches_its_certificate(pki: DevPki, name: str) -> None:
    key = serialization.load_pem_private_key(getattr(pki, f"{name}_key").read_bytes(), password=None)
    public = cert(getattr(pki, f"{name}_cert")).public_key()
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(*spki) == public.public_bytes(*spki)


def test_the_jwks_holds_one_public_eddsa_key(pki: DevPki) -> None:
    keys = json.loads(pki.jwks.read_text())["keys"]
    assert len(keys) == 1
    (jwk,) = keys
    assert jwk["alg"] == "EdDSA" and jwk["kty"] == "OKP" and jwk["crv"] == "Ed25519"
    assert jwk["kid"] == pki.jwt_kid and jwk["kid"].startswith("dev-")
    assert "d" not in jwk
    signing = serialization.load_pem_private_key(pki.jwt_key.read_bytes(), password=None)
    assert isinstance(signing, ed25519.Ed25519PrivateKey)
    raw = signing.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert jwk["x"] == base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_public_files_hold_no_private_key(pki: DevPki) -> None:
    for path in (pki.ca_cert, pki.gateway_cert, pki.worker_cert, pki.jwks):
        assert b"PRIVATE KEY" not in path.read_bytes(), path.name


def test_a_service_certificate_carries_its_spiffe_id_and_is_private(tmp_path: Path, pki: DevPki) -> None:
    from cryptography import x509

    from control.pki import issue_service_cert

    issued = issue_service_cert(pki, tenant="acme", service="batch", out_dir=tmp_path / "svc")
    assert issued.spiffe_id == "spiffe://airlock.local/tenant/acme/svc/batch"
    cert = x509.load_pem_x509_certificate(issued.cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [issued.spiffe_id]
    service_ca = x509.load_pem_x509_certificate(pki.service_ca_cert.read_bytes())
    assert cert.issuer == service_ca.subject  # the service CA, never the one workers trust
    assert mode(issued.key) == 0o600
