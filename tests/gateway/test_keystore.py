"""The tenant keystore, both backends through one suite: lifecycle, persistence, reload, locking.

Each test gets its own state directory (its own store and, for the file backend, master key); the
PKCS#11 backend runs against the session's SoftHSM2 token, where per-tenant KEKs persist.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gateway.keys.store import KeyNotFoundError, KeystoreError, ensure_tenant_keys
from tests.keystore_site import Site, make_site


@pytest.fixture(params=["file", "pkcs11"])
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Site:
    return make_site(request, tmp_path)


def test_create_makes_one_active_32_byte_key(site: Site) -> None:
    ks = site.open()
    info = ks.create("acme")
    assert (info.tenant, info.state, info.backend) == ("acme", "active", site.backend)
    assert info.key_id.startswith("acme-k") and len(info.key_id) == len("acme-k") + 8
    key_id, key = ks.active("acme")
    assert key_id == info.key_id and len(key) == 32
    assert ks.key("acme", key_id) == key
    assert ks.usable("acme") == {key_id: key}
    assert ks.list() == [info]
    with pytest.raises(KeystoreError, match="already has a key"):
        ks.create("acme")


def test_rotate_keeps_old_key_decrypt_only_and_retire_destroys_it(site: Site) -> None:
    ks = site.open()
    first = ks.create("acme")
    _, first_key = ks.active("acme")
    second = ks.rotate("acme")
    second_id, second_key = ks.active("acme")
    assert second_id == second.key_id != first.key_id and second_key != first_key
    assert [(i.key_id, i.state) for i in ks.list("acme")] == [
        (first.key_id, "decrypt-only"),
        (second.key_id, "active"),
    ]
    assert ks.key("acme", first.key_id) == first_key  # still opens what it sealed
    assert ks.usable("acme") == {first.key_id: first_key, second.key_id: second_key}

    with pytest.raises(KeystoreError, match="active key"):
        ks.retire("acme", second.key_id)
    retired = ks.retire("acme", first.key_id)
    assert retired.state == "retired"
    with pytest.raises(KeyNotFoundError, match="retired"):
        ks.key("acme", first.key_id)
    with pytest.raises(KeyNotFoundError):
        ks.retire("acme", first.key_id)
    assert ks.usable("acme") == {second.key_id: second_key}
    assert [i.state for i in ks.list("acme")] == ["retired", "active"]
    # The wrapped key is gone from the store; only the id stays, so it is never reused.
    stored = {e["key_id"]: e for e in site.entries()}
    assert stored[first.key_id]["blob"] is None and stored[first.key_id]["state"] == "retired"


def test_unknown_tenant_or_key_is_key_not_found(site: Site) -> None:
    ks = site.open()
    ks.create("acme")
    ks.create("globex")
    globex_id, _ = ks.active("globex")
    with pytest.raises(KeyNotFoundError):
        ks.active("initech")
    with pytest.raises(KeyNotFoundError):
        ks.key("acme", "acme-k00000000")
    with pytest.raises(KeyNotFoundError):
        ks.key("acme", globex_id)  # another tenant's key id is not acme's
    with pytest.raises(KeyNotFoundError):
        ks.rotate("initech")
    with pytest.raises(KeyNotFoundError):
        ks.retire("acme", globex_id)
    assert ks.usable("initech") == {}
    assert ks.list("initech") == []
    with pytest.raises(KeystoreError, match="bad tenant name"):
        ks.create("Not A Tenant")


def test_keys_persist_and_a_second_instance_opens_them(site: Site) -> None:
    ks = site.open()
    ks.create("acme")
    ks.rotate("acme")
    again = site.open()
    assert again.list() == ks.list()
    assert again.usable("acme") == ks.usable("acme")
    assert site.store.stat().st_mode & 0o777 == 0o600
    assert (site.state_dir / "keys").stat().st_mode & 0o777 == 0o700


def test_generation_bumps_on_every_change(site: Site) -> None:
    ks = site.open()
    g0 = ks.generation
    info = ks.create("acme")
    assert ks.generation == g0 + 1
    ks.rotate("acme")
    assert ks.generation == g0 + 2
    ks.retire("acme", info.key_id)
    assert ks.generation == g0 + 3
    assert ks.reload() is False and ks.generation == g0 + 3  # its own writes are not news
    ks.active("acme")
    ks.list()
    assert ks.generation == g0 + 3


def test_reload_sees_a_rotation_made_by_the_cli(site: Site) -> None:
    gateway = site.open()
    gateway.create("acme")
    before_id, before_key = gateway.active("acme")
    generation = gateway.generation

    done = site.cli("keys", "rotate", "--tenant", "acme")
    assert done.returncode == 0, done.stderr

    assert gateway.active("acme")[0] == before_id  # nothing changes until the gateway reloads
    assert gateway.reload() is True
    assert gateway.generation == generation + 1
    after_id, after_key = gateway.active("acme")
    assert after_id != before_id and after_key != before_key
    assert gateway.key("acme", before_id) == before_key
    assert gateway.reload() is False and gateway.generation == generation + 1

    assert site.cli("keys", "retire", "--tenant", "acme", "--key-id", before_id).returncode == 0
    assert gateway.reload() is True
    with pytest.raises(KeyNotFoundError):
        gateway.key("acme", before_id)  # a retired key is dropped from memory too


def test_concurrent_cli_rotations_lose_no_update(site: Site) -> None:
    site.open().create("acme")
    script = (
        "import sys; from pathlib import Path; from gateway.config import load\n"
        "from gateway.keys import open_keystore\n"
        "cfg = load(Path(sys.argv[1]), state_dir=Path(sys.argv[2]))\n"
        "ks = open_keystore(cfg.keys, cfg.state_dir)\n"
        "for _ in range(5): ks.rotate('acme')\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(site.config), str(site.state_dir)])
        for _ in range(3)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    infos = site.open().list("acme")
    assert len(infos) == 16 and len({i.key_id for i in infos}) == 16
    assert sum(i.state == "active" for i in infos) == 1


def test_ensure_tenant_keys_creates_only_missing_keys(site: Site) -> None:
    ks = site.open()
    existing = ks.create("acme")
    made = ensure_tenant_keys(ks, ["acme", "globex"])
    assert [(i.tenant, i.state) for i in made] == [("globex", "active")]
    assert ks.active("acme")[0] == existing.key_id
    assert ensure_tenant_keys(ks, ["acme", "globex"]) == []
    stale = site.open()
    fresh = site.open().create("initech")  # by another process, after `stale` loaded the store
    assert ensure_tenant_keys(stale, ["initech"]) == []
    assert stale.active("initech")[0] == fresh.key_id


def test_store_never_holds_a_data_key(site: Site) -> None:
    ks = site.open()
    ks.create("acme")
    ks.rotate("acme")
    raw = site.store.read_bytes()
    for key in ks.usable("acme").values():
        assert key not in raw and base64.b64encode(key) not in raw and key.hex().encode() not in raw


def _flip(entries: list[dict[str, object]], key_id: str) -> None:
    for e in entries:
        if e["key_id"] == key_id:
            blob = bytearray(base64.b64decode(str(e["blob"])))
            blob[len(blob) // 2] ^= 0x01
            e["blob"] = base64.b64encode(bytes(blob)).decode()


def test_tampered_blob_is_refused(site: Site) -> None:
    site.open().create("acme")
    key_id = site.entries()[0]["key_id"]
    site.rewrite(lambda entries: _flip(entries, str(key_id)))
    with pytest.raises(KeystoreError, match="fails") as err:
        site.open().active("acme")
    assert not isinstance(err.value, KeyNotFoundError)


def test_blob_moved_to_another_tenant_is_refused(site: Site) -> None:
    ks = site.open()
    ks.create("acme")
    ks.create("globex")

    def move(entries: list[dict[str, object]]) -> None:
        acme = next(e for e in entries if e["tenant"] == "acme")
        globex = next(e for e in entries if e["tenant"] == "globex")
        globex["blob"] = acme["blob"]

    site.rewrite(move)
    moved = site.open()
    with pytest.raises(KeystoreError, match="fails"):
        moved.active("globex")
    assert len(moved.active("acme")[1]) == 32


def test_blobs_swapped_between_keys_of_one_tenant_are_refused(site: Site) -> None:
    ks = site.open()
    ks.create("acme")
    ks.rotate("acme")

    def swap(entries: list[dict[str, object]]) -> None:
        entries[0]["blob"], entries[1]["blob"] = entries[1]["blob"], entries[0]["blob"]

    site.rewrite(swap)
    swapped = site.open()
    with pytest.raises(KeystoreError, match="fails"):
        swapped.active("acme")


def test_a_readable_store_is_refused(site: Site) -> None:
    site.open().create("acme")
    site.store.chmod(0o640)
    with pytest.raises(KeystoreError, match=r"keystore .*keystore\.json.* mode 0640"):
        site.open()


def test_a_corrupt_store_is_refused_without_quoting_it(site: Site) -> None:
    site.open().create("acme")
    site.store.write_text('{"format": 1, "keys": [SECRET-ISH')
    with pytest.raises(KeystoreError, match="not a valid store") as err:
        site.open()
    assert "SECRET" not in str(err.value)


def test_a_vanished_store_keeps_the_loaded_keys(site: Site) -> None:
    ks = site.open()
    ks.create("acme")
    before = ks.active("acme")
    site.store.unlink()
    with pytest.raises(KeystoreError, match="the file is gone"):
        ks.reload()
    assert ks.active("acme") == before


def _entry(key_id: str, state: str = "active", blob: str | None = "AA==") -> dict[str, object]:
    return {"tenant": "acme", "key_id": key_id, "state": state, "created": 1.0, "blob": blob}


@pytest.mark.parametrize(
    "entry",
    [
        _entry("acme-corp-k0123abcd"),  # another tenant's id pattern
        _entry("globex-k0123abcd"),
        _entry("acme-k0123abcd", "paused"),
        _entry("acme-k0123abcd", "retired"),  # retired, yet a wrapped key
        _entry("acme-k0123abcd", "active", None),  # usable, yet no wrapped key
        _entry("acme-k0123abcd", "decrypt-only"),  # a tenant without an active key
        _entry("acme-k0123abcd", blob="not base64!"),
        "not an object",
    ],
)
def test_malformed_entries_are_refused(site: Site, entry: object) -> None:
    site.open().create("globex")
    site.rewrite(lambda entries: entries.append(entry))  # type: ignore[arg-type]
    with pytest.raises(KeystoreError, match=r"keystore .*keystore\.json"):
        site.open()


def test_readers_never_lose_a_key_while_keys_rotate(site: Site) -> None:
    """What a request sealed under the active key still opens after any number of rotations."""
    gateway = site.open()
    gateway.create("acme")
    operator = site.open()  # another instance, as the CLI would be
    failures: list[BaseException] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                key_id, key = gateway.active("acme")  # "seal"
                gateway.reload()
                assert gateway.key("acme", key_id) == key  # "open", after the keys changed
            except BaseException as exc:
                failures.append(exc)
                return

    readers = [threading.Thread(target=serve) for _ in range(3)]
    for t in readers:
        t.start()
    for _ in range(10):
        operator.rotate("acme")
    stop.set()
    for t in readers:
        t.join(timeout=60)
    assert failures == []
    assert gateway.reload() in (True, False)
    assert gateway.active("acme")[0] == operator.active("acme")[0]
    assert len(gateway.usable("acme")) == 11
