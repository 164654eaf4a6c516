"""`FileKeystore`: data keys sealed at rest with AES-256-GCM under a master key file.

The master key (32 random bytes, mode 0600) is made on first use, which suits development; in
production provision it (or use the PKCS#11 backend) and keep it off backups of the store.
Each wrapped key is bound to its tenant and key id as associated data, so a blob copied to another
tenant's or key's entry fails authentication instead of handing out the wrong key.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.keys.store import KEY_BYTES, KeystoreError, StoredKeystore, aad, check_private_file

__all__ = ["FileKeystore"]

_NONCE = 12


class FileKeystore(StoredKeystore):
    backend = "file"

    def __init__(self, store: Path, master_key: Path) -> None:
        self.master_key_file = master_key
        self._master = AESGCM(_load_or_create_master(master_key))
        super().__init__(store)

    def _wrap_new(self, tenant: str, key_id: str) -> bytes:
        # A fresh random nonce per wrap: each key is wrapped once, so at most a few thousand
        # messages ever see the master key, far below the random-nonce bound of AES-GCM.
        nonce = secrets.token_bytes(_NONCE)
        return nonce + self._master.encrypt(nonce, secrets.token_bytes(KEY_BYTES), aad(tenant, key_id))

    def _unwrap(self, tenant: str, key_id: str, blob: bytes) -> bytes:
        try:
            return self._master.decrypt(blob[:_NONCE], blob[_NONCE:], aad(tenant, key_id))
        except InvalidTag:
            raise KeystoreError(
                f"key {key_id} of tenant {tenant!r} in {self.store} fails authentication "
                f"(altered, moved from another entry, or sealed under another master key)"
            ) from None


def _load_or_create_master(path: Path) -> bytes:
    if not path.exists():
        _create_master(path)
    check_private_file(path, "master key")
    data = path.read_bytes()
    if len(data) != KEY_BYTES:
        raise KeystoreError(f"master key {path}: must be exactly {KEY_BYTES} bytes, has {len(data)}")
    return data


def _create_master(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Written whole to a 0600 temp file, then linked into place: link fails if another process got
    # there first, so two first uses can't each write a different master key.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(KEY_BYTES))
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
