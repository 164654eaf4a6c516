"""Signed bundles in a real object store (the session's local Ceph RGW): pushed, streamed with
parallel ranged GETs and verified; a tampered, missing, resized or unsigned object is refused with
the file named before anything lands in the cache; a cached copy is verified again on reuse."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from serving.bundle import MANIFEST, SIGNATURE, BundleError, create_manifest, manifest_files, sign_bundle
from serving.remote_bundle import pull, push
from serving.s3 import ObjectStore, S3Settings, S3Url, StorageError, load_credentials
from tests.ceph import S3Site

KEY = ed25519.Ed25519PrivateKey.generate()
Trusted = dict[str, ed25519.Ed25519PublicKey]


def s3_settings(site: S3Site, **changes: object) -> S3Settings:
    # Small parts, so that every file of these tests streams as several ranged GETs in flight.
    base = S3Settings(site.endpoint, credentials_file=site.credentials_file, parallel=4, part_bytes=64 << 10)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def store(s3_site: S3Site) -> ObjectStore:
    return ObjectStore(s3_settings(s3_site))


@pytest.fixture
def trusted() -> Trusted:
    from serving.bundle import key_id

    return {key_id(KEY.public_key()): KEY.public_key()}


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    directory = tmp_path / "model"
    (directory / "sub").mkdir(parents=True)
    (directory / "config.json").write_text('{"model_type": "llama"}')
    (directory / "model.safetensors").write_bytes(os.urandom(600_000))  # 10 parts of 64 KiB
    (directory / "sub" / "tokenizer.json").write_text("{}")
    (directory / "empty.txt").write_bytes(b"")
    create_manifest(directory, name="tiny")
    sign_bundle(directory, KEY)
    return directory


@pytest.fixture
def url(store: ObjectStore, bundle: Path, trusted: Trusted) -> S3Url:
    location = S3Url.parse(f"s3://models-{secrets.token_hex(4)}/tiny/v1")
    assert push(store, bundle, location, trusted) == 4
    return location


def refused(store: ObjectStore, url: S3Url, target: Path, trusted: Trusted) -> BundleError:
    with pytest.raises(BundleError) as caught:
        pull(store, url, target, trusted)
    assert not target.exists(), "nothing unverified may land where an engine loads from"
    assert not [p for p in target.parent.glob(".*") if p.is_dir()], "no partial download is left"
    return caught.value


def test_a_pushed_bundle_streams_back_verified_and_the_cache_is_reused(
    store: ObjectStore, url: S3Url, bundle: Path, trusted: Trusted, tmp_path: Path
) -> None:
    target = tmp_path / "cache" / "tiny"
    pulled = pull(store, url, target, trusted)
    assert (pulled.name, pulled.files, pulled.cached) == ("tiny", 4, False)
    for rel in ("config.json", "model.safetensors", "sub/tokenizer.json", "empty.txt", MANIFEST, SIGNATURE):
        assert (target / rel).read_bytes() == (bundle / rel).read_bytes(), rel
    again = pull(store, url, target, trusted)
    assert again.cached and again.directory == target


def test_a_tampered_object_is_refused_naming_the_file(
    store: ObjectStore, url: S3Url, bundle: Path, trusted: Trusted, tmp_path: Path
) -> None:
    data = bytearray((bundle / "model.safetensors").read_bytes())
    data[400_000] ^= 1  # one bit, same size, in a part in the middle
    store.put(url.bucket, url.key("model.safetensors"), bytes(data))
    error = refused(store, url, tmp_path / "cache" / "tiny", trusted)
    assert (error.reason, error.file) == ("BUNDLE_FILE_ALTERED", "model.safetensors")
    assert "model.safetensors" in str(error)


def test_a_missing_object_is_refused_naming_the_file(
    store: ObjectStore, url: S3Url, trusted: Trusted, tmp_path: Path
) -> None:
    store.delete(url.bucket, url.key("sub/tokenizer.json"))
    error = refused(store, url, tmp_path / "cache" / "tiny", trusted)
    assert (error.reason, error.file) == ("BUNDLE_FILE_MISSING", "sub/tokenizer.json")


def test_an_object_longer_or_shorter_than_signed_is_refused(
    store: ObjectStore, url: S3Url, bundle: Path, trusted: Trusted, tmp_path: Path
) -> None:
    original = (bundle / "model.safetensors").read_bytes()
    for changed in (original + b"\x00" * 10, original[:-10]):  # extra bytes after the signed ones too
        store.put(url.bucket, url.key("model.safetensors"), changed)
        error = refused(store, url, tmp_path / "cache" / "tiny", trusted)
        assert (error.reason, error.file) == ("BUNDLE_FILE_ALTERED", "model.safetensors")


def test_an_altered_or_unsigned_manifest_is_refused_before_any_file_is_read(
    store: ObjectStore, url: S3Url, bundle: Path, trusted: Trusted, tmp_path: Path
) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"]["config.json"]["sha256"] = "0" * 64
    store.put(url.bucket, url.key(MANIFEST), json.dumps(manifest).encode())
    error = refused(store, url, tmp_path / "cache" / "tiny", trusted)
    assert (error.reason, error.file) == ("BUNDLE_SIGNATURE_INVALID", MANIFEST)
    store.delete(url.bucket, url.key(SIGNATURE))
    assert refused(store, url, tmp_path / "cache" / "tiny", trusted).reason == "BUNDLE_UNSIGNED"


def test_a_bundle_signed_by_an_untrusted_key_is_refused(
    store: ObjectStore, url: S3Url, tmp_path: Path
) -> None:
    from serving.bundle import key_id

    other = ed25519.Ed25519PrivateKey.generate().public_key()
    error = refused(store, url, tmp_path / "cache" / "tiny", {key_id(other): other})
    assert error.reason == "BUNDLE_KEY_UNTRUSTED"


def test_a_cached_copy_is_verified_on_reuse_and_fetched_again_when_altered(
    store: ObjectStore, url: S3Url, bundle: Path, trusted: Trusted, tmp_path: Path
) -> None:
    target = tmp_path / "cache" / "tiny"
    pull(store, url, target, trusted)
    (target / "config.json").write_text('{"model_type": "evil"}')
    again = pull(store, url, target, trusted)
    assert not again.cached
    assert (target / "config.json").read_bytes() == (bundle / "config.json").read_bytes()


def test_a_new_version_in_the_store_replaces_the_cached_one(
    store: ObjectStore, url: S3Url, bundle: Path, trusted: Trusted, tmp_path: Path
) -> None:
    target = tmp_path / "cache" / "tiny"
    pull(store, url, target, trusted)
    (bundle / "config.json").write_text('{"model_type": "llama", "v": 2}')
    create_manifest(bundle, name="tiny")
    sign_bundle(bundle, KEY)
    push(store, bundle, url, trusted)
    again = pull(store, url, target, trusted)
    assert not again.cached and (target / "config.json").read_text().endswith("2}")


def test_a_signed_manifest_never_names_a_file_outside_its_bundle() -> None:
    for rel in ("../escape", "/etc/passwd", "a//b", "./x", "a/../../b", MANIFEST):
        doc = {"format": "airlock-bundle/1", "name": "x", "files": {rel: {"sha256": "0" * 64, "size": 1}}}
        with pytest.raises(BundleError) as caught:
            manifest_files(json.dumps(doc).encode(), where="s3://b/p")
        assert caught.value.reason == "BUNDLE_MANIFEST_INVALID", rel


def test_credentials_come_from_a_private_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "creds"
    path.write_text("# site store\naccess_key_id = AK1\nsecret_access_key = s3cr3t\n")
    path.chmod(0o644)
    settings = S3Settings("http://127.0.0.1:1", credentials_file=path)
    with pytest.raises(StorageError) as caught:
        load_credentials(settings)
    assert caught.value.reason == "STORAGE_CREDENTIALS" and "s3cr3t" not in str(caught.value)
    path.chmod(0o600)
    assert load_credentials(settings) == ("AK1", "s3cr3t")
    env = S3Settings("http://127.0.0.1:1", access_key_env="SITE_AK", secret_key_env="SITE_SK")
    with pytest.raises(StorageError):
        load_credentials(env)
    monkeypatch.setenv("SITE_AK", "AK2")
    monkeypatch.setenv("SITE_SK", "sk2")
    assert load_credentials(env) == ("AK2", "sk2")


def test_an_unreachable_store_is_a_storage_error_not_a_hang(tmp_path: Path, s3_site: S3Site) -> None:
    dead = ObjectStore(s3_settings(s3_site, endpoint="http://127.0.0.1:9", timeout_seconds=2.0))
    with pytest.raises(StorageError) as caught:
        pull(dead, S3Url.parse("s3://models/x"), tmp_path / "x", {})
    assert caught.value.reason == "STORAGE_UNAVAILABLE"


def test_s3_urls_are_checked() -> None:
    assert S3Url.parse("s3://models/llama/v1/") == S3Url("models", "llama/v1")
    for bad in ("http://x/y", "s3://A/x", "s3://ok-bucket/a/../b", "s3://x"):
        with pytest.raises(StorageError):
            S3Url.parse(bad)


def test_pull_never_replaces_a_directory_that_is_not_a_bundle(
    store: ObjectStore, url: S3Url, trusted: Trusted, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match="not a bundle"):
        pull(store, url, home, trusted)
    assert (home / "notes.txt").read_text() == "mine"
