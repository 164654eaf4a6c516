"""PLACEHOLDER until the keystore branch lands: the Keystore interface and a minimal file store."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KeyState = Literal["active", "decrypt-only", "retired"]


@dataclass(frozen=True)
class KeyInfo:
    tenant: str
    key_id: str
    state: KeyState
    created: float
    backend: str


class KeystoreError(Exception):
    pass


class KeyNotFoundError(KeystoreError):
    pass


class Keystore(Protocol):
    def create(self, tenant: str) -> KeyInfo: ...
    def rotate(self, tenant: str) -> KeyInfo: ...
    def list(self, tenant: str | None = None) -> list[KeyInfo]: ...
    def active(self, tenant: str) -> tuple[str, bytes]: ...
    def key(self, tenant: str, key_id: str) -> bytes: ...
    def usable(self, tenant: str) -> dict[str, bytes]: ...
    def reload(self) -> bool: ...
    @property
    def generation(self) -> int: ...


class FileKeystore:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = directory / "keystore.json"
        master = directory / "master.key"
        if not master.exists():
            fd = os.open(master, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, os.urandom(32))
            os.close(fd)
        self._aead = AESGCM(master.read_bytes())
        self._generation = 0
        self._mtime = 0.0
        self._data: dict[str, list[dict[str, object]]] = {}
        self.reload()

    @property
    def generation(self) -> int:
        return self._generation

    def reload(self) -> bool:
        mtime = self.path.stat().st_mtime if self.path.exists() else 0.0
        if mtime == self._mtime:
            return False
        self._mtime = mtime
        self._data = json.loads(self.path.read_text()) if self.path.exists() else {}
        self._generation += 1
        return True

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._data))
        os.chmod(tmp, 0o600)
        tmp.replace(self.path)
        self.reload()

    def create(self, tenant: str) -> KeyInfo:
        return self.rotate(tenant)

    def rotate(self, tenant: str) -> KeyInfo:
        entries = self._data.setdefault(tenant, [])
        for e in entries:
            if e["state"] == "active":
                e["state"] = "decrypt-only"
        key_id = f"{tenant}-k{os.urandom(4).hex()}"
        nonce = os.urandom(12)
        blob = nonce + self._aead.encrypt(nonce, os.urandom(32), f"{tenant}|{key_id}".encode())
        entries.append({"key_id": key_id, "state": "active", "created": time.time(), "blob": blob.hex()})
        self._save()
        return KeyInfo(tenant, key_id, "active", time.time(), "file")

    def list(self, tenant: str | None = None) -> list[KeyInfo]:
        return [
            KeyInfo(t, str(e["key_id"]), e["state"], float(e["created"]), "file")  # type: ignore[arg-type]
            for t, entries in self._data.items() if tenant in (None, t) for e in entries
        ]  # fmt: skip

    def _open(self, tenant: str, entry: dict[str, object]) -> bytes:
        blob = bytes.fromhex(str(entry["blob"]))
        return self._aead.decrypt(blob[:12], blob[12:], f"{tenant}|{entry['key_id']}".encode())

    def active(self, tenant: str) -> tuple[str, bytes]:
        for e in self._data.get(tenant, []):
            if e["state"] == "active":
                return str(e["key_id"]), self._open(tenant, e)
        raise KeyNotFoundError(f"tenant {tenant!r} has no active key")

    def key(self, tenant: str, key_id: str) -> bytes:
        for e in self._data.get(tenant, []):
            if e["key_id"] == key_id and e["state"] != "retired":
                return self._open(tenant, e)
        raise KeyNotFoundError(f"no usable key {key_id!r} for tenant {tenant!r}")

    def usable(self, tenant: str) -> dict[str, bytes]:
        return {str(e["key_id"]): self._open(tenant, e) for e in self._data.get(tenant, [])
                if e["state"] != "retired"}  # fmt: skip


def open_keystore(state_dir: Path) -> Keystore:
    return FileKeystore(state_dir / "keys")


def ensure_tenant_keys(keystore: Keystore, tenants: list[str]) -> None:
    have = {k.tenant for k in keystore.list() if k.state == "active"}
    for tenant in tenants:
        if tenant not in have:
            keystore.create(tenant)
