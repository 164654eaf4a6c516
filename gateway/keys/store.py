"""Per-tenant data keys: create, rotate, retire, and hand the gateway the keys it seals with.

Metadata (tenant, key id, state, created, the wrapped key) lives in one JSON store file, written
atomically under a lock file so CLI invocations and a running gateway never see half a change.
How a data key is wrapped is the backend's business: `FileKeystore` (file.py, a master key file)
or `Pkcs11Keystore` (pkcs11.py, key-encryption keys that never leave an HSM token);
`gateway.keys.open_keystore` opens the one the configuration names.

Lifecycle of a key: active (seals and opens) -> decrypt-only (opens only, after a rotation) ->
retired (its wrapped key is destroyed; the id stays recorded so it is never reused).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import os
import re
import secrets
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

if TYPE_CHECKING:
    pass

__all__ = [
    "KeyInfo",
    "KeyNotFoundError",
    "KeyState",
    "Keystore",
    "KeystoreError",
    "StoredKeystore",
    "check_private_file",
    "ensure_tenant_keys",
]

KeyState = Literal["active", "decrypt-only", "retired"]
KEY_BYTES = 32  # AES-256
_STATES: tuple[str, ...] = get_args(KeyState)
_TENANT = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_FORMAT = 1


@dataclass(frozen=True)
class KeyInfo:
    tenant: str
    key_id: str  # e.g. "acme-k3f9a1c2" (unique, never reused)
    state: KeyState
    created: float  # unix time
    backend: str  # "file" | "pkcs11"


class KeystoreError(Exception):
    """A keystore operation failed; the message names files, tenants and key ids, never key material."""


class KeyNotFoundError(KeystoreError):
    """Unknown tenant or key id, or a retired key."""


class Keystore(Protocol):
    def create(self, tenant: str) -> KeyInfo: ...
    def rotate(self, tenant: str) -> KeyInfo: ...
    def retire(self, tenant: str, key_id: str) -> KeyInfo: ...
    def list(self, tenant: str | None = None) -> list[KeyInfo]: ...
    def active(self, tenant: str) -> tuple[str, bytes]: ...
    def key(self, tenant: str, key_id: str) -> bytes: ...
    def usable(self, tenant: str) -> dict[str, bytes]: ...
    def reload(self) -> bool: ...
    @property
    def generation(self) -> int: ...


def check_private_file(path: Path, what: str) -> os.stat_result:
    """Refuse a secret-bearing file that another user could read or that someone else owns."""
    try:
        st = path.stat()
    except OSError as exc:
        raise KeystoreError(f"{what} {path}: cannot stat ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeystoreError(f"{what} {path}: not a regular file")
    if st.st_uid != os.geteuid():
        raise KeystoreError(
            f"{what} {path}: owned by uid {st.st_uid}, not by the current user (uid {os.geteuid()}); refusing"
        )
    if st.st_mode & 0o077:
        raise KeystoreError(
            f"{what} {path}: mode {stat.S_IMODE(st.st_mode):04o} lets group or others access it; "
            f"refusing (chmod 600 {path})"
        )
    return st


def aad(tenant: str, key_id: str) -> bytes:
    """What a wrapped key is bound to, so a blob moved to another tenant or key id fails to open."""
    return f"airlock-keystore-v1\0{tenant}\0{key_id}".encode()


@dataclass(frozen=True)
class _Record:
    info: KeyInfo
    blob: bytes | None  # None once retired: the wrapped key is destroyed


class StoredKeystore:
    """The JSON store, its lock, reload and the state machine; subclasses wrap and unwrap keys."""

    backend = ""

    def __init__(self, store: Path) -> None:
        self.store = store
        self._lock_path = store.with_name(store.name + ".lock")
        self._mutex = threading.RLock()
        self._records: dict[str, _Record] = {}
        self._cache: dict[tuple[str, bytes], bytes] = {}  # (key id, blob) -> data key
        self._stamp: tuple[int, ...] | None = None
        self._generation = 0
        store.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._mutex:
            self._records, self._stamp = self._read()

    # -- what a backend provides -------------------------------------------------------------

    def _wrap_new(self, tenant: str, key_id: str) -> bytes:
        """Make a new data key for (tenant, key id) and return it wrapped."""
        raise NotImplementedError

    def _unwrap(self, tenant: str, key_id: str, blob: bytes) -> bytes:
        """The data key in `blob`; KeystoreError when it fails authentication."""
        raise NotImplementedError

    # -- the Keystore protocol ---------------------------------------------------------------

    @property
    def generation(self) -> int:
        return self._generation

    def create(self, tenant: str) -> KeyInfo:
        _check_tenant(tenant)

        def change(records: dict[str, _Record]) -> KeyInfo:
            if _active(records, tenant) is not None:
                raise KeystoreError(f"tenant {tenant!r} already has a key; use rotate for a new one")
            return self._add(records, tenant)

        return self._mutate(change)

    def rotate(self, tenant: str) -> KeyInfo:
        _check_tenant(tenant)

        def change(records: dict[str, _Record]) -> KeyInfo:
            old = _active(records, tenant)
            if old is None:
                raise KeyNotFoundError(f"tenant {tenant!r} has no key to rotate; use create first")
            info = self._add(records, tenant)
            records[old.info.key_id] = replace(old, info=replace(old.info, state="decrypt-only"))
            return info

        return self._mutate(change)

    def retire(self, tenant: str, key_id: str) -> KeyInfo:
        _check_tenant(tenant)

        def change(records: dict[str, _Record]) -> KeyInfo:
            record = _find(records, tenant, key_id)
            if record.info.state == "active":
                raise KeystoreError(
                    f"key {key_id} is the active key of tenant {tenant!r}; rotate first, then retire it"
                )
            retired = _Record(replace(record.info, state="retired"), None)
            records[key_id] = retired
            return retired.info

        return self._mutate(change)

    def list(self, tenant: str | None = None) -> list[KeyInfo]:
        with self._mutex:
            infos = [r.info for r in self._records.values() if tenant is None or r.info.tenant == tenant]
        return sorted(infos, key=lambda i: (i.tenant, i.created, i.key_id))

    def active(self, tenant: str) -> tuple[str, bytes]:
        with self._mutex:
            record = _active(self._records, tenant)
            if record is None:
                raise KeyNotFoundError(f"tenant {tenant!r} has no active key")
            return record.info.key_id, self._open(record)

    def key(self, tenant: str, key_id: str) -> bytes:
        with self._mutex:
            return self._open(_find(self._records, tenant, key_id))

    def usable(self, tenant: str) -> dict[str, bytes]:
        with self._mutex:
            return {
                r.info.key_id: self._open(r)
                for r in self._records.values()
                if r.info.tenant == tenant and r.info.state != "retired"
            }

    def reload(self) -> bool:
        with self._mutex:
            now = self._stat()
            if now == self._stamp:
                return False
            if now is None:
                # Keep serving what we have: a vanished store is an accident to report, not an
                # instruction to forget every tenant's keys.
                raise KeystoreError(f"keystore {self.store}: the file is gone; keeping the keys loaded")
            records, stamp = self._read()
            self._stamp = stamp
            if records == self._records:
                return False
            self._adopt(records)
            return True

    # -- internals ---------------------------------------------------------------------------

    def _add(self, records: dict[str, _Record], tenant: str) -> KeyInfo:
        key_id = f"{tenant}-k{secrets.token_hex(4)}"
        while key_id in records:  # ids are never reused, retired ones included
            key_id = f"{tenant}-k{secrets.token_hex(4)}"
        info = KeyInfo(tenant, key_id, "active", time.time(), self.backend)
        records[key_id] = _Record(info, self._wrap_new(tenant, key_id))
        return info

    def _open(self, record: _Record) -> bytes:
        if record.blob is None or record.info.state == "retired":
            raise KeyNotFoundError(f"key {record.info.key_id} of tenant {record.info.tenant!r} is retired")
        cached = self._cache.get((record.info.key_id, record.blob))
        if cached is None:
            cached = self._unwrap(record.info.tenant, record.info.key_id, record.blob)
            if len(cached) != KEY_BYTES:
                raise KeystoreError(f"key {record.info.key_id}: unwrapped key has the wrong length")
            self._cache[(record.info.key_id, record.blob)] = cached
        return cached

    def _adopt(self, records: dict[str, _Record]) -> None:
        self._records = records
        live = {(k, r.blob) for k, r in records.items() if r.blob is not None}
        self._cache = {k: v for k, v in self._cache.items() if k in live}
        self._generation += 1

    def _mutate(self, change: Callable[[dict[str, _Record]], KeyInfo]) -> KeyInfo:
        # Re-read under the lock file: another process may have changed the store since we loaded it.
        with self._mutex, self._locked():
            records, _ = self._read()
            info = change(records)
            self._write(records)
            self._stamp = self._stat()
            self._adopt(records)
            return info

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _stat(self) -> tuple[int, ...] | None:
        try:
            st = self.store.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _read(self) -> tuple[dict[str, _Record], tuple[int, ...] | None]:
        if not self.store.exists():
            return {}, None
        check_private_file(self.store, "keystore")
        with self.store.open("rb") as fh:
            st = os.fstat(fh.fileno())
            data = fh.read()
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        try:
            raw = json.loads(data)
            return self._parse(raw), stamp
        except (ValueError, TypeError, KeyError, AttributeError, binascii.Error) as exc:
            # Never quote the file: it holds wrapped keys.
            raise KeystoreError(f"keystore {self.store}: not a valid store ({type(exc).__name__})") from None

    def _parse(self, raw: Any) -> dict[str, _Record]:
        if raw.get("format") != _FORMAT:
            raise KeystoreError(f"keystore {self.store}: unknown format {raw.get('format')!r}")
        if raw.get("backend") != self.backend:
            raise KeystoreError(
                f"keystore {self.store}: written by the {raw.get('backend')!r} backend, "
                f"configured backend is {self.backend!r}"
            )
        records: dict[str, _Record] = {}
        for entry in raw["keys"]:
            tenant, key_id, state = str(entry["tenant"]), str(entry["key_id"]), entry["state"]
            valid = _TENANT.fullmatch(tenant) and re.fullmatch(rf"{re.escape(tenant)}-k[0-9a-f]{{8}}", key_id)
            if not valid or state not in _STATES or key_id in records:
                raise KeystoreError(f"keystore {self.store}: bad or duplicate entry for key {key_id[:80]!r}")
            blob = None if entry["blob"] is None else base64.b64decode(entry["blob"], validate=True)
            if (blob is None) != (state == "retired"):
                raise KeystoreError(f"keystore {self.store}: key {key_id}: wrapped key does not match state")
            info = KeyInfo(tenant, key_id, state, float(entry["created"]), self.backend)
            records[key_id] = _Record(info, blob)
        for tenant in {r.info.tenant for r in records.values()}:
            if sum(r.info.tenant == tenant and r.info.state == "active" for r in records.values()) != 1:
                raise KeystoreError(f"keystore {self.store}: tenant {tenant!r} must have one active key")
        return records

    def _write(self, records: dict[str, _Record]) -> None:
        keys = [
            {
                "tenant": r.info.tenant,
                "key_id": r.info.key_id,
                "state": r.info.state,
                "created": r.info.created,
                "blob": None if r.blob is None else base64.b64encode(r.blob).decode(),
            }
            for r in records.values()
        ]
        data = json.dumps({"format": _FORMAT, "backend": self.backend, "keys": keys}, indent=1).encode()
        # mkstemp makes the file 0600; replace is atomic, so readers see the old or the new store.
        fd, tmp = tempfile.mkstemp(dir=self.store.parent, prefix=f".{self.store.name}.")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.store)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.store.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _check_tenant(tenant: str) -> None:
    if not _TENANT.fullmatch(tenant):
        raise KeystoreError(f"bad tenant name {tenant[:80]!r}: lowercase letters, digits and '-'")


def _active(records: dict[str, _Record], tenant: str) -> _Record | None:
    return next((r for r in records.values() if r.info.tenant == tenant and r.info.state == "active"), None)


def _find(records: dict[str, _Record], tenant: str, key_id: str) -> _Record:
    record = records.get(key_id)
    if record is None or record.info.tenant != tenant:
        raise KeyNotFoundError(f"tenant {tenant!r} has no key {key_id[:80]!r}")
    if record.info.state == "retired":
        raise KeyNotFoundError(f"key {key_id} of tenant {tenant!r} is retired")
    return record


def ensure_tenant_keys(keystore: Keystore, tenants: Iterable[str]) -> list[KeyInfo]:
    """Create a first key for every tenant that has none (the dev setup); returns the new keys."""
    made = []
    for tenant in tenants:
        if any(i.state == "active" for i in keystore.list(tenant)):
            continue
        try:
            made.append(keystore.create(tenant))
        except KeystoreError:
            # Another process may have created it since we loaded the store: that is fine.
            keystore.reload()
            if not any(i.state == "active" for i in keystore.list(tenant)):
                raise
    return made
