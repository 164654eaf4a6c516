"""Tenant data keys: the keystore (store.py) and its backends (file.py: a master key file;
pkcs11.py: an HSM token); `open_keystore` opens the one the configuration names."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gateway.keys.store import Keystore, KeystoreError, ensure_tenant_keys

if TYPE_CHECKING:
    from gateway.config import KeysConfig

__all__ = ["Keystore", "KeystoreError", "ensure_tenant_keys", "open_keystore"]


def open_keystore(config: KeysConfig, state_dir: Path) -> Keystore:
    """The keystore the `[keys]` configuration describes (files default under state_dir/keys)."""
    store = config.store or state_dir / "keys" / "keystore.json"
    if config.backend == "pkcs11":
        from gateway.keys.pkcs11 import Pkcs11Keystore

        return Pkcs11Keystore.from_config(config.pkcs11, store)
    from gateway.keys.file import FileKeystore

    return FileKeystore(store, config.file.master_key or state_dir / "keys" / "master.key")
