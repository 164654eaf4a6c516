"""Signed bundles: a directory (model weights, an update) with a manifest of sha256 digests and an
Ed25519 signature over that manifest, checked against a trusted-keys file.

    DIR/airlock-bundle.json  {"format": "airlock-bundle/1", "name": N, "files": {PATH: {"sha256", "size"}}}
    DIR/airlock-bundle.sig   {"key_id": K, "alg": "Ed25519", "sig": BASE64}  over the manifest's bytes

The trusted-keys file holds one or more PEM public keys (Ed25519). A bundle verifies only if its
signature is by one of them, every listed file is present with its digest, and nothing else is
in the directory: an added file (a pickle, a custom code module) is as dangerous as a changed one.
Shared by the `airlock bundle` commands and the worker, which refuses a model that fails.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

__all__ = [
    "MANIFEST",
    "SIGNATURE",
    "BundleError",
    "create_manifest",
    "key_id",
    "load_private_key",
    "load_trusted_keys",
    "manifest_files",
    "sign_bundle",
    "verify_bundle",
    "verify_signature",
]

FORMAT = "airlock-bundle/1"
MANIFEST = "airlock-bundle.json"
SIGNATURE = "airlock-bundle.sig"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_PEM = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.DOTALL)


class BundleError(Exception):
    """A bundle is unsigned, signed by an untrusted key, or differs from its manifest (names the file)."""

    def __init__(self, message: str, *, reason: str, file: str | None = None) -> None:
        super().__init__(message)
        self.reason, self.file = reason, file


@dataclass(frozen=True)
class Verified:
    name: str
    key_id: str
    files: int


def key_id(public: ed25519.Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _walk(directory: Path) -> dict[str, Path]:
    """Every file under `directory` but the bundle's own two, by POSIX relative path. Links refused:
    a bundle must be the bytes it lists, not a pointer to bytes elsewhere."""
    found: dict[str, Path] = {}
    for root, dirs, files in os.walk(directory):
        for name in sorted(dirs + files):
            path = Path(root) / name
            rel = path.relative_to(directory).as_posix()
            if path.is_symlink():
                raise BundleError(f"{directory}: {rel} is a symbolic link", reason="BUNDLE_LINK", file=rel)
            if name in files and rel not in (MANIFEST, SIGNATURE):
                found[rel] = path
    return found


def create_manifest(directory: Path, *, name: str | None = None) -> Path:
    """Write `DIR/airlock-bundle.json` listing every file's sha256 (any old signature is removed)."""
    files = {rel: {"sha256": sha256_file(p), "size": p.stat().st_size} for rel, p in _walk(directory).items()}
    manifest = {"format": FORMAT, "name": name or directory.name, "files": dict(sorted(files.items()))}
    (directory / SIGNATURE).unlink(missing_ok=True)
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def load_private_key(path: Path) -> ed25519.Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise BundleError(f"{path}: not an Ed25519 private key", reason="BUNDLE_KEY_INVALID")
    return key


def load_trusted_keys(path: Path) -> dict[str, ed25519.Ed25519PublicKey]:
    """The Ed25519 public keys in a PEM file, by key id. A file with none trusts nothing."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"trusted keys {path}: {exc.strerror}", reason="BUNDLE_KEYS_UNREADABLE") from None
    keys: dict[str, ed25519.Ed25519PublicKey] = {}
    for block in _PEM.findall(data):
        key = serialization.load_pem_public_key(block)
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise BundleError(
                f"trusted keys {path}: only Ed25519 keys are accepted", reason="BUNDLE_KEY_INVALID"
            )
        keys[key_id(key)] = key
    if not keys:
        raise BundleError(f"trusted keys {path}: no public key in the file", reason="BUNDLE_KEYS_EMPTY")
    return keys


def sign_bundle(directory: Path, key: ed25519.Ed25519PrivateKey) -> Path:
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise BundleError(
            f"{directory}: no {MANIFEST}; run `airlock bundle create` first", reason="BUNDLE_UNSIGNED"
        )
    entry = {
        "key_id": key_id(key.public_key()),
        "alg": "Ed25519",
        "sig": base64.b64encode(key.sign(manifest.read_bytes())).decode(),
    }
    path = directory / SIGNATURE
    path.write_text(json.dumps(entry) + "\n")
    return path


def verify_bundle(directory: Path, trusted: dict[str, ed25519.Ed25519PublicKey]) -> Verified:
    """Check the signature first (nothing in an unsigned manifest is worth reading), then every file."""
    manifest_bytes = _read(directory / MANIFEST, "no manifest: the bundle is unsigned", "BUNDLE_UNSIGNED")
    signature = _read(directory / SIGNATURE, "no signature: the bundle is unsigned", "BUNDLE_UNSIGNED")
    signer = verify_signature(manifest_bytes, signature, trusted, where=str(directory))
    name, listed = manifest_files(manifest_bytes, where=str(directory))
    present = _walk(directory)
    for rel in sorted(set(present) - set(listed)):
        raise BundleError(f"{directory}: {rel} is not in the signed manifest (extra file)",
                          reason="BUNDLE_FILE_EXTRA", file=rel)  # fmt: skip
    for rel in sorted(listed):
        if rel not in present:
            raise BundleError(f"{directory}: {rel} is missing", reason="BUNDLE_FILE_MISSING", file=rel)
    # Files hash in parallel (hashlib drops the GIL): a model's shards verify at several cores' speed.
    with concurrent.futures.ThreadPoolExecutor(min(len(listed), os.cpu_count() or 1, 8) or 1) as pool:
        digests = dict(
            zip(sorted(listed), pool.map(lambda r: sha256_file(present[r]), sorted(listed)), strict=True)
        )
    for rel, want in sorted(listed.items()):
        if digests[rel] != want.get("sha256"):
            raise BundleError(f"{directory}: {rel} differs from the signed manifest (sha256 mismatch)",
                              reason="BUNDLE_FILE_ALTERED", file=rel)  # fmt: skip
    return Verified(name or directory.name, signer, len(listed))


def verify_signature(
    manifest: bytes, signature: bytes, trusted: dict[str, ed25519.Ed25519PublicKey], *, where: str
) -> str:
    """The id of the trusted key whose signature over `manifest` is `signature`, or BundleError."""
    try:
        entry = json.loads(signature)
        signer, raw = str(entry["key_id"]), base64.b64decode(entry["sig"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise BundleError(
            f"{where}: {SIGNATURE}: unreadable signature", reason="BUNDLE_SIGNATURE_INVALID"
        ) from None
    key = trusted.get(signer)
    if key is None:
        raise BundleError(
            f"{where}: signed by key {signer}, which is not in the trusted keys",
            reason="BUNDLE_KEY_UNTRUSTED",
        )
    try:
        key.verify(raw, manifest)
    except InvalidSignature:
        raise BundleError(
            f"{where}: {MANIFEST}: the signature does not match (the manifest was altered)",
            reason="BUNDLE_SIGNATURE_INVALID", file=MANIFEST,
        ) from None  # fmt: skip
    return signer


def manifest_files(manifest: bytes, *, where: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """A manifest's name and files, each a safe relative path with a sha256 and a size: signed
    or not, a manifest never names a file outside its bundle (`../x`, `/etc/x`)."""
    try:
        doc = json.loads(manifest)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("files"), dict):
        raise BundleError(f"{where}: {MANIFEST}: not an {FORMAT} manifest", reason="BUNDLE_MANIFEST_INVALID")
    files: dict[str, dict[str, Any]] = doc["files"]
    for rel, entry in files.items():
        parts = rel.split("/")
        sized = isinstance(entry, dict) and isinstance(entry.get("size"), int) and entry["size"] >= 0
        if (
            not rel.isprintable() or len(rel) > 1024 or "\\" in rel or rel in (MANIFEST, SIGNATURE)
            or any(p in ("", ".", "..") for p in parts)
            or not sized or not isinstance(entry.get("sha256"), str) or not _HEX64.fullmatch(entry["sha256"])
        ):  # fmt: skip
            raise BundleError(f"{where}: {MANIFEST}: entry {rel[:200]!r} is not a file of the bundle "
                              "with a sha256 and a size", reason="BUNDLE_MANIFEST_INVALID")  # fmt: skip
    return str(doc.get("name", "")), files


def _read(path: Path, missing: str, reason: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{path.parent}: {missing}", reason=reason) from None
