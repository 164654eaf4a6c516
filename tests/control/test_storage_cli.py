"""`airlock bundle push|pull|verify` against the session's local Ceph RGW: what an operator types."""

from __future__ import annotations

import secrets
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from control.cli import main as airlock
from serving.bundle import create_manifest, sign_bundle
from serving.s3 import ObjectStore, S3Settings, S3Url
from tests.ceph import S3Site


@pytest.fixture
def setup(tmp_path: Path, s3_site: S3Site) -> tuple[Path, Path, Path]:
    key = ed25519.Ed25519PrivateKey.generate()
    trusted = tmp_path / "trusted.pem"
    pem = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    trusted.write_bytes(key.public_key().public_bytes(*pem))
    bundle = tmp_path / "model"
    bundle.mkdir()
    (bundle / "config.json").write_text("{}")
    (bundle / "weights.bin").write_bytes(secrets.token_bytes(100_000))
    create_manifest(bundle, name="tiny")
    sign_bundle(bundle, key)
    config = tmp_path / "airlock.toml"
    config.write_text(
        textwrap.dedent(f"""
        [models.echo]
        engine = "echo"
        [tenants.acme]
        models = ["echo"]
        [bundles]
        trusted_keys = "{trusted}"
    """)
        + s3_site.toml()
    )
    return bundle, config, tmp_path


def test_push_verify_pull_round_trip(
    setup: tuple[Path, Path, Path], s3_site: S3Site, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle, config, tmp = setup
    url = f"s3://models-{secrets.token_hex(4)}/tiny/v1"
    assert airlock(["bundle", "push", str(bundle), url, "--config", str(config)]) == 0
    assert airlock(["bundle", "verify", url, "--config", str(config)]) == 0
    assert airlock(["bundle", "pull", url, str(tmp / "copy"), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "OK pushed" in out and "streamed and verified" in out
    assert (tmp / "copy" / "weights.bin").read_bytes() == (bundle / "weights.bin").read_bytes()
    # A tampered object: verify and pull both fail, naming the file.
    store = ObjectStore(S3Settings(s3_site.endpoint, credentials_file=s3_site.credentials_file))
    location = S3Url.parse(url)
    store.put(location.bucket, location.key("weights.bin"), secrets.token_bytes(100_000))
    assert airlock(["bundle", "verify", url, "--config", str(config)]) == 1
    assert airlock(["bundle", "pull", url, str(tmp / "copy2"), "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert out.count("weights.bin differs from the signed manifest") == 2
    assert not (tmp / "copy2").exists()
