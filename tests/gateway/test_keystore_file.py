"""`FileKeystore`: the master key file (made on first use, 0600) and the refusals around it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.keys.file import FileKeystore
from gateway.keys.store import KeystoreError


def make(tmp_path: Path) -> FileKeystore:
    return FileKeystore(tmp_path / "keys" / "keystore.json", tmp_path / "keys" / "master.key")


def test_master_key_is_made_on_first_use_private_and_kept(tmp_path: Path) -> None:
    ks = make(tmp_path)
    master = tmp_path / "keys" / "master.key"
    assert master.stat().st_mode & 0o777 == 0o600 and len(master.read_bytes()) == 32
    before = master.read_bytes()
    ks.create("acme")
    assert make(tmp_path).active("acme") == ks.active("acme")
    assert master.read_bytes() == before
    assert not [p for p in master.parent.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_group_or_world_access_to_the_master_key_is_refused(tmp_path: Path, mode: int) -> None:
    make(tmp_path)
    master = tmp_path / "keys" / "master.key"
    master.chmod(mode)
    with pytest.raises(KeystoreError) as err:
        make(tmp_path)
    assert str(master) in str(err.value) and f"mode {mode:04o}" in str(err.value)
    assert "chmod 600" in str(err.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_a_master_key_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    make(tmp_path)
    master = tmp_path / "keys" / "master.key"
    os.chown(master, 4242, 4242)
    with pytest.raises(KeystoreError, match=r"owned by uid 4242, not by the current user"):
        make(tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_a_store_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    make(tmp_path).create("acme")
    os.chown(tmp_path / "keys" / "keystore.json", 4242, 4242)
    with pytest.raises(KeystoreError, match=r"keystore .* owned by uid 4242"):
        make(tmp_path)


def test_a_master_key_of_the_wrong_length_is_refused(tmp_path: Path) -> None:
    master = tmp_path / "keys" / "master.key"
    master.parent.mkdir()
    master.write_bytes(b"short")
    master.chmod(0o600)
    with pytest.raises(KeystoreError, match="exactly 32 bytes, has 5"):
        make(tmp_path)


def test_another_master_key_cannot_open_the_store(tmp_path: Path) -> None:
    make(tmp_path).create("acme")
    (tmp_path / "keys" / "master.key").write_bytes(os.urandom(32))
    with pytest.raises(KeystoreError, match="another master key"):
        make(tmp_path).active("acme")


def test_a_store_of_the_other_backend_is_refused(tmp_path: Path) -> None:
    make(tmp_path).create("acme")
    store = tmp_path / "keys" / "keystore.json"
    store.write_text(store.read_text().replace('"backend": "file"', '"backend": "pkcs11"'))
    with pytest.raises(KeystoreError, match="written by the 'pkcs11' backend"):
        make(tmp_path)
