"""Signed bundles: a good bundle verifies; unsigned, altered, extra, missing files, links and a
wrong key are each refused with the reason and the file named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from serving.bundle import (
    MANIFEST,
    SIGNATURE,
    BundleError,
    create_manifest,
    key_id,
    load_trusted_keys,
    sign_bundle,
    verify_bundle,
)

KEY = ed25519.Ed25519PrivateKey.generate()


def pem(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture
def trusted(tmp_path: Path) -> dict[str, ed25519.Ed25519PublicKey]:
    path = tmp_path / "trusted.pem"
    path.write_bytes(pem(ed25519.Ed25519PrivateKey.generate()) + pem(KEY))  # two keys; KEY is the second
    return load_trusted_keys(path)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    directory = tmp_path / "model"
    (directory / "sub").mkdir(parents=True)
    (directory / "config.json").write_text('{"model_type": "llama"}')
    (directory / "model.safetensors").write_bytes(b"\x00weights" * 1000)
    (directory / "sub" / "tokenizer.json").write_text("{}")
    create_manifest(directory, name="tiny")
    sign_bundle(directory, KEY)
    return directory


def refused(bundle: Path, trusted: dict[str, ed25519.Ed25519PublicKey]) -> BundleError:
    with pytest.raises(BundleError) as caught:
        verify_bundle(bundle, trusted)
    return caught.value


def test_a_good_bundle_verifies(bundle: Path, trusted: dict[str, ed25519.Ed25519PublicKey]) -> None:
    verified = verify_bundle(bundle, trusted)
    assert (verified.name, verified.files, verified.key_id) == ("tiny", 3, key_id(KEY.public_key()))
    listed = json.loads((bundle / MANIFEST).read_text())["files"]
    assert set(listed) == {"config.json", "model.safetensors", "sub/tokenizer.json"}


def test_an_unsigned_bundle_is_refused(bundle: Path, trusted: dict[str, ed25519.Ed25519PublicKey]) -> None:
    (bundle / SIGNATURE).unlink()
    assert refused(bundle, trusted).reason == "BUNDLE_UNSIGNED"


def test_a_directory_without_manifest_is_refused(
    tmp_path: Path, trusted: dict[str, ed25519.Ed25519PublicKey]
) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert refused(tmp_path, trusted).reason == "BUNDLE_UNSIGNED"


def test_an_altered_file_is_refused_and_named(
    bundle: Path, trusted: dict[str, ed25519.Ed25519PublicKey]
) -> None:
    with (bundle / "model.safetensors").open("r+b") as fh:
        fh.write(b"\x01")
    err = refused(bundle, trusted)
    assert (err.reason, err.file) == ("BUNDLE_FILE_ALTERED", "model.safetensors")
    assert "model.safetensors differs" in str(err)


def test_an_extra_file_is_refused_and_named(
    bundle: Path, trusted: dict[str, ed25519.Ed25519PublicKey]
) -> None:
    (bundle / "sub" / "evil.py").write_text("import os")
    err = refused(bundle, trusted)
    assert (err.reason, err.file) == ("BUNDLE_FILE_EXTRA", "sub/evil.py")


def test_a_missing_file_is_refused_and_named(
    bundle: Path, trusted: dict[str, ed25519.Ed25519PublicKey]
) -> None:
    (bundle / "sub" / "tokenizer.json").unlink()
    err = refused(bundle, trusted)
    assert (err.reason, err.file) == ("BUNDLE_FILE_MISSING", "sub/tokenizer.json")


def test_a_symlink_is_refused(
    bundle: Path, trusted: dict[str, ed25519.Ed25519PublicKey], tmp_path: Path
) -> None:
    (tmp_path / "outside").write_text("x")
    (bundle / "link").symlink_to(tmp_path / "outside")
    assert refused(bundle, trusted).reason == "BUNDLE_LINK"


def test_a_wrong_key_is_refused(bundle: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.pem"
    other.write_bytes(pem(ed25519.Ed25519PrivateKey.generate()))
    err = refused(bundle, load_trusted_keys(other))
    assert err.reason == "BUNDLE_KEY_UNTRUSTED"


def test_a_forged_signature_under_a_trusted_key_id_is_refused(
    bundle: Path, trusted: dict[str, ed25519.Ed25519PublicKey]
) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"]["model.safetensors"]["sha256"] = "0" * 64  # edit the manifest to match other weights
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    err = refused(bundle, trusted)
    assert (err.reason, err.file) == ("BUNDLE_SIGNATURE_INVALID", MANIFEST)


def test_a_trusted_keys_file_without_keys_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.pem").write_text("# nobody\n")
    with pytest.raises(BundleError) as caught:
        load_trusted_keys(tmp_path / "empty.pem")
    assert caught.value.reason == "BUNDLE_KEYS_EMPTY"
