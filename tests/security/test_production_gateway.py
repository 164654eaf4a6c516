"""A production gateway: certificates from the site's CA named in `[tls]`, no development PKI. It
serves with them as given, and its host holds no CA private key; a missing file stops it, naming
the key, without making one."""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.config import load
from gateway.keys import ensure_tenant_keys, open_keystore
from tests.conftest import make_policy_dir
from tests.security.certs import make_ca

PEM = serialization.Encoding.PEM


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> None:
    path.write_bytes(key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.chmod(0o600)


def _leaf(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], name: str
) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    return cert.public_bytes(PEM), key


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Path]:
    """The site's CAs live with the issuer (tmp/issuer); the gateway host gets certificates only."""
    issuer, etc, state = tmp_path / "issuer", tmp_path / "etc", tmp_path / "state"
    for d in (issuer, etc, state):
        d.mkdir(mode=0o700)
    internal, services, attest = (
        make_ca("site internal CA"),
        make_ca("site services CA"),
        make_ca("attest CA"),
    )
    for name, (key, cert) in {"internal": internal, "services": services, "attest": attest}.items():
        _write_key(issuer / f"{name}-ca.key", key)
        (etc / f"{name}-ca.crt").write_bytes(cert.public_bytes(PEM))
    cert, key = _leaf(internal, "airlock-gateway")
    (etc / "gateway.crt").write_bytes(cert)
    _write_key(etc / "gateway.key", key)
    audit_key = ed25519.Ed25519PrivateKey.generate()
    _write_key(etc / "audit-signing.key", audit_key)
    jwk = {"kty": "OKP", "crv": "Ed25519", "kid": "idp-1", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
    (etc / "idp-jwks.json").write_text(json.dumps({"keys": [jwk]}))
    policy = make_policy_dir(tmp_path / "policy")
    (etc / "airlock.toml").write_text(
        textwrap.dedent(f"""
        state_dir = "{state}"
        policy_dir = "{policy}"
        [gateway]
        listen = "127.0.0.1:0"
        mtls_listen = "127.0.0.1:0"
        [http]
        listen = "127.0.0.1:0"
        [[auth.issuers]]
        issuer = "airlock-dev"
        jwks_file = "{etc / "idp-jwks.json"}"
        [audit]
        signing_key = "{etc / "audit-signing.key"}"
        [tls]
        cert = "{etc / "gateway.crt"}"
        key = "{etc / "gateway.key"}"
        worker_ca = "{etc / "internal-ca.crt"}"
        service_ca = "{etc / "services-ca.crt"}"
        attestation_ca = "{etc / "attest-ca.crt"}"
        [models.echo]
        engine = "echo"
        [tenants.acme]
        models = ["echo"]
    """)
    )
    cfg = load(etc / "airlock.toml")
    ensure_tenant_keys(open_keystore(cfg.keys, cfg.state_dir), ["acme"])  # `airlock keys create`
    return {"issuer": issuer, "etc": etc, "state": state, "config": etc / "airlock.toml"}


def _gateway(config: Path, ready: Path) -> subprocess.Popen[bytes]:
    # The worker route points nowhere: readiness is NOT_SERVING, which is all this test needs.
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "--config", str(config), "--route", "acme/echo/echo=127.0.0.1:9",
         "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


def _private_keys(root: Path) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and b"PRIVATE KEY" in path.read_bytes():
            found.append(path)
    return found


def test_a_production_gateway_serves_the_sites_certificate_and_holds_no_ca_key(site: dict[str, Path]) -> None:
    ready = site["state"] / "gateway.ready"
    gateway = _gateway(site["config"], ready)
    try:
        end = time.monotonic() + 60
        while not ready.exists():
            assert gateway.poll() is None and time.monotonic() < end, (
                gateway.stderr.read() if gateway.stderr else ""
            )
            time.sleep(0.05)
        port = json.loads(ready.read_text())["port"]
        ca = (site["etc"] / "internal-ca.crt").read_bytes()
        options = (("grpc.ssl_target_name_override", "localhost"),)
        with grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(ca), options) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING  # up, its worker is not
        # The HTTP door serves the same certificate (a name the site's CA vouches for).
        context = ssl.create_default_context(cafile=str(site["etc"] / "internal-ca.crt"))
        http_port = json.loads(ready.read_text())["http_port"]
        raw = socket.create_connection(("127.0.0.1", http_port), timeout=10)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /v1/models HTTP/1.1\r\nhost: localhost\r\n\r\n")
            assert tls.recv(4096).startswith(b"HTTP/1.1 401")  # no token: refused, over the site's TLS
    finally:
        gateway.terminate()
        gateway.wait(30)
    assert not (site["state"] / "pki").exists()
    ca_publics = {
        x509.load_pem_x509_certificate((site["etc"] / f"{n}-ca.crt").read_bytes()).public_key().public_bytes(
            PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        for n in ("internal", "services", "attest")
    }  # fmt: skip
    host = [*_private_keys(site["state"]), *_private_keys(site["etc"])]
    assert host, "the host holds the gateway's own keys"
    for path in host:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        public = key.public_key().public_bytes(PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        assert public not in ca_publics, f"{path} is a CA private key"


def test_a_missing_certificate_stops_the_gateway_naming_the_key(site: dict[str, Path]) -> None:
    config = site["config"]
    config.write_text(config.read_text().replace(f'cert = "{site["etc"] / "gateway.crt"}"',
                                                 f'cert = "{site["etc"] / "missing.crt"}"'))  # fmt: skip
    gateway = _gateway(config, site["state"] / "gateway.ready")
    _, err = gateway.communicate(timeout=60)
    assert gateway.returncode == 2
    assert b"tls.cert: " in err and b"missing.crt is not a file" in err
    assert not (site["state"] / "pki").exists()


def test_the_development_defaults_are_not_made_by_the_gateway(site: dict[str, Path]) -> None:
    """Without [tls], the gateway looks for the dev PKI's files and refuses when they are absent."""
    config = site["config"]
    text = config.read_text()
    config.write_text(text[: text.index("[tls]")] + text[text.index("[models.echo]") :])
    gateway = _gateway(config, site["state"] / "gateway.ready")
    _, err = gateway.communicate(timeout=60)
    assert gateway.returncode == 2
    assert b"tls.cert: " in err and b"the development PKI is made by `airlock up`" in err
    assert not (site["state"] / "pki").exists()
