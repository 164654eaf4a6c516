"""`airlock audit verify --archive`: the local trail against the heads its WORM copy holds. An
attacker on the gateway host with its audit signing key cuts the tail off, removes the signatures,
writes new records and signs them again: every local check passes, and the archive's heads, which
no one can delete, still catch it. A forged head put into the archive proves nothing and is named."""

from __future__ import annotations

import json
import secrets
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from prometheus_client import CollectorRegistry

from control.audit_verify import verify_log
from control.cli import main as airlock
from gateway.archive import ArchiveLayout, Archiver
from gateway.audit import AuditLog
from gateway.config import AuditArchiveConfig, AuditConfig
from serving.s3 import ObjectStore, S3Settings
from tests.ceph import S3Site

KEY = ed25519.Ed25519PrivateKey.generate()
AUDIT = AuditConfig(rotate_bytes=0, sign_every_records=10, sign_every_seconds=0, fsync="never")


def write(path: Path, count: int, who: str = "u") -> None:
    log = AuditLog(path, config=AUDIT, signing_key=KEY)
    for i in range(count):
        log.record("authorization", decision="allow", subject=f"acme/{who}{i}", tenant="acme")
    log.close()


@pytest.fixture
def setup(tmp_path: Path, s3_site: S3Site) -> tuple[Path, Path, Path, str]:
    """A log of 50 records whose heads are archived; a config naming the store; the public key."""
    url = f"s3://audit-{secrets.token_hex(4)}/site"
    path = tmp_path / "audit" / "gateway.jsonl"
    write(path, 50)
    s3 = S3Settings(s3_site.endpoint, credentials_file=s3_site.credentials_file)
    archive = AuditArchiveConfig(url=url, retention_days=1)
    assert Archiver(path, archive, s3, registry=CollectorRegistry()).run_once()
    pub = tmp_path / "audit.pub"
    pem = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    pub.write_bytes(KEY.public_key().public_bytes(*pem))
    config = tmp_path / "airlock.toml"
    config.write_text(
        textwrap.dedent(f"""
        [models.echo]
        engine = "echo"
        [tenants.acme]
        models = ["echo"]
        [audit.archive]
        url = "{url}"
    """)
        + s3_site.toml()
    )
    return path, config, pub, url


def verify(
    config: Path, path: Path, pub: Path, capsys: pytest.CaptureFixture[str], *archive: str
) -> tuple[int, str]:
    code = airlock(["audit", "verify", "--config", str(config), "--file", str(path), "--key", str(pub),
                    "--archive", *archive])  # fmt: skip
    return code, capsys.readouterr().out


def truncate_and_resign(path: Path, keep: int) -> None:
    """What an attacker holding the host (and its signing key) does: cut the log after `keep`
    records, remove the signatures, append records of their own and sign them again."""
    kept = path.read_bytes().splitlines(keepends=True)[:keep]
    path.write_bytes(b"".join(kept))
    path.with_name(f"{path.name}.sig").unlink()
    write(path, 30, who="forged")


def test_an_untouched_trail_agrees_with_its_archive(
    setup: tuple[Path, Path, Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    path, config, pub, _url = setup
    code, out = verify(config, path, pub, capsys)
    assert code == 0, out
    assert "5 archived head(s) checked" in out


def test_a_truncated_and_resigned_tail_is_caught_by_the_archive_alone(
    setup: tuple[Path, Path, Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    path, config, pub, url = setup
    truncate_and_resign(path, keep=35)
    local = verify_log(path, KEY.public_key(), require_signed=True)
    assert local.ok, "the rewritten trail passes every local check: only the archive can tell"
    code, out = verify(config, path, pub, capsys, url)  # the URL given explicitly this time
    assert code == 1
    assert "FAIL" in out and "seq 49" in out and "rewritten" in out, out


def test_a_tail_cut_off_with_its_signatures_is_caught(
    setup: tuple[Path, Path, Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    path, config, pub, _url = setup
    kept = path.read_bytes().splitlines(keepends=True)[:25]
    path.write_bytes(b"".join(kept))
    path.with_name(f"{path.name}.sig").unlink()
    code, out = verify(config, path, pub, capsys)
    assert code == 1 and "truncated" in out and "ends at seq 24" in out, out


def test_a_forged_head_in_the_archive_proves_nothing_and_is_named(
    setup: tuple[Path, Path, Path, str], s3_site: S3Site, capsys: pytest.CaptureFixture[str]
) -> None:
    path, config, pub, url = setup
    forger = ed25519.Ed25519PrivateKey.generate()
    layout = ArchiveLayout.of(url, path.name)
    fake = "f" * 64
    doc = {"format": "airlock-audit-head/1", "log": path.name, "seq": 60, "hash": fake, "ts": 0.0,
           "key_id": "0" * 16, "sig": "AAAA" + forger.sign(b"x").hex()[:4]}  # fmt: skip
    store = ObjectStore(S3Settings(s3_site.endpoint, credentials_file=s3_site.credentials_file))
    store.put(layout.url.bucket, layout.head_key(60, fake), json.dumps(doc).encode())
    code, out = verify(config, path, pub, capsys)
    assert code == 1 and "not signed by a trusted key" in out and "forged" in out, out
