"""`Pkcs11Keystore`: data keys wrapped by per-tenant key-encryption keys that never leave an HSM token.

Per tenant the token holds one AES-256 KEK (label `airlock-kek-<tenant>`), generated inside the token
as sensitive and non-extractable. Data keys are generated in the token, wrapped there with AES key
wrap (RFC 3394) and only the wrapped blobs reach the JSON store. The gateway needs a data key's bytes
to seal payloads, so unwrapping imports the key as a short-lived session object, reads its value and
destroys the object. Developed against SoftHSM2; any PKCS#11 v2.40 token with CKM_AES_KEY_WRAP works.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac

from gateway.keys.store import KeystoreError, StoredKeystore, aad, check_private_file

try:  # the `hsm` extra; without it, only constructing a Pkcs11Keystore fails (with a clear error)
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass, Session
    from pkcs11.exceptions import PinIncorrect, PinLocked, PKCS11Error, UserAlreadyLoggedIn
    from pkcs11.types import UnwrapMixin, WrapMixin
except ImportError:
    HAVE_PKCS11 = False
else:
    HAVE_PKCS11 = True

if TYPE_CHECKING:
    from pkcs11 import SecretKey

    from gateway.config import Pkcs11KeysConfig

T = TypeVar("T")

__all__ = ["MODULE_PATHS", "Pkcs11Keystore", "find_module", "kek_label"]

# Where Debian/Ubuntu (and a source build) put SoftHSM2's module.
MODULE_PATHS = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
_WRAPPED = 40  # AES key wrap of a 32-byte key
# A PKCS#11 module is initialised once per process and its login state is shared by every session
# of the process, so token work from all keystore instances is serialised here.
_TOKEN_LOCK = threading.Lock()


def kek_label(tenant: str) -> str:
    return f"airlock-kek-{tenant}"


def find_module() -> Path | None:
    return next((Path(p) for p in MODULE_PATHS if Path(p).is_file()), None)


def _binding(data_key: bytes, tenant: str, key_id: str) -> hmac.HMAC:
    # AES key wrap has no associated data: this tag, keyed by the data key itself, ties a wrapped key
    # to its key id, so blobs swapped between two keys of one tenant are refused. (Another tenant's
    # blob already fails: its KEK is different.)
    mac = hmac.HMAC(data_key, hashes.SHA256())
    mac.update(aad(tenant, key_id))
    return mac


class Pkcs11Keystore(StoredKeystore):
    backend = "pkcs11"

    def __init__(self, store: Path, *, module: Path, token_label: str, pin: str) -> None:
        if not HAVE_PKCS11:
            raise KeystoreError("the pkcs11 keys backend needs python-pkcs11: pip install 'airlock[hsm]'")
        self._pin = pin
        self._token_lock_path = store.with_name(store.name + ".token.lock")
        store.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            with self._token_locked():
                lib = pkcs11.lib(str(module))
                self._token = lib.get_token(token_label=token_label)
        except pkcs11.exceptions.NoSuchToken:
            raise KeystoreError(f"PKCS#11 module {module}: no token labelled {token_label!r}") from None
        except PKCS11Error as exc:
            raise KeystoreError(f"PKCS#11 module {module}: cannot load ({type(exc).__name__})") from None
        self._session(lambda s: None)  # fail at start-up on a wrong PIN, not at the first request
        super().__init__(store)

    @contextlib.contextmanager
    def _token_locked(self) -> Iterator[None]:
        # Token work is serialised within the process (shared login state) and across the processes
        # that share this store (the CLI beside a gateway): SoftHSM2's file-backed tokens fail with
        # CKR_GENERAL_ERROR or vanish under concurrent multi-process use (SoftHSMv2 #757). Keys are
        # cached once unwrapped, so this costs only create, rotate and a key's first use.
        with _TOKEN_LOCK:
            fd = os.open(self._token_lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    @classmethod
    def from_config(cls, config: Pkcs11KeysConfig, store: Path) -> Pkcs11Keystore:
        module = config.module or find_module()
        if module is None:
            raise KeystoreError(
                f"no PKCS#11 module configured and SoftHSM2 is not in {', '.join(MODULE_PATHS)}; "
                f"set [keys.pkcs11] module"
            )
        if not module.is_file():
            raise KeystoreError(f"PKCS#11 module {module}: no such file")
        return cls(store, module=module, token_label=config.token_label, pin=_read_pin(config))

    def _session(self, work: Callable[[Session], T]) -> T:
        """Run `work(session)` in a fresh logged-in read/write session."""
        with self._token_locked():
            try:
                try:
                    session = self._token.open(rw=True, user_pin=self._pin)
                except UserAlreadyLoggedIn:
                    # Login state belongs to the whole process: another session of it (an operator
                    # tool, a test) is logged in, so ours is too and must not log out when done.
                    # (python-pkcs11 leaves the refused session open; the gateway is normally the
                    # only PKCS#11 user in its process, so this path is rare.)
                    session = self._token.open(rw=True)
                with session:
                    return work(session)
            except PinIncorrect:
                raise KeystoreError(f"PKCS#11 token {self._token.label!r}: the user PIN is wrong") from None
            except PinLocked:
                raise KeystoreError(f"PKCS#11 token {self._token.label!r}: the user PIN is locked") from None

    def _kek(self, session: Session, tenant: str, *, create: bool) -> SecretKey:
        label = kek_label(tenant)
        found = session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label})
        keys = [k for k in found if isinstance(k, pkcs11.SecretKey)]
        if len(keys) > 1:
            raise KeystoreError(f"PKCS#11 token holds {len(keys)} keys labelled {kek_label(tenant)!r}")
        if keys:
            return keys[0]
        if not create:
            raise KeystoreError(
                f"PKCS#11 token {self._token.label!r} has no key-encryption key for tenant {tenant!r} "
                f"(deleted, or the wrong token)"
            )
        return session.generate_key(
            KeyType.AES,
            256,
            label=kek_label(tenant),
            store=True,
            capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP,
            template={
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.PRIVATE: True,
                Attribute.MODIFIABLE: False,
            },
        )

    def _wrap_new(self, tenant: str, key_id: str) -> bytes:
        def work(session: Session) -> bytes:
            kek = self._kek(session, tenant, create=True)
            if not isinstance(kek, WrapMixin):
                raise KeystoreError(f"PKCS#11 key {kek_label(tenant)!r} cannot wrap keys")
            data_key = session.generate_key(
                KeyType.AES, 256, label=key_id, store=False,
                template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
            )  # fmt: skip
            try:
                wrapped = bytes(kek.wrap_key(data_key, mechanism=Mechanism.AES_KEY_WRAP))
                tag = _binding(bytes(data_key[Attribute.VALUE]), tenant, key_id).finalize()
            finally:
                data_key.destroy()
            return wrapped + tag

        try:
            return self._session(work)
        except PKCS11Error as exc:
            raise KeystoreError(
                f"PKCS#11: making a key for tenant {tenant!r} failed ({type(exc).__name__})"
            ) from None

    def _unwrap(self, tenant: str, key_id: str, blob: bytes) -> bytes:
        refused = KeystoreError(
            f"key {key_id} of tenant {tenant!r} in {self.store} fails to unwrap "
            f"(altered, moved from another entry, or wrapped by another token's key)"
        )
        if len(blob) != _WRAPPED + 32:
            raise refused

        def work(session: Session) -> bytes:
            kek = self._kek(session, tenant, create=False)
            if not isinstance(kek, UnwrapMixin):
                raise KeystoreError(f"PKCS#11 key {kek_label(tenant)!r} cannot unwrap keys")
            key = kek.unwrap_key(
                ObjectClass.SECRET_KEY, KeyType.AES, blob[:_WRAPPED],
                mechanism=Mechanism.AES_KEY_WRAP, store=False,
                template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
            )  # fmt: skip
            try:
                return bytes(key[Attribute.VALUE])
            finally:
                key.destroy()

        try:
            data_key = self._session(work)
        except PKCS11Error as exc:
            raise KeystoreError(f"{refused} ({type(exc).__name__})") from None
        try:
            _binding(data_key, tenant, key_id).verify(blob[_WRAPPED:])
        except InvalidSignature:
            raise refused from None
        return data_key


def _read_pin(config: Pkcs11KeysConfig) -> str:
    if config.pin_file is not None:
        check_private_file(config.pin_file, "PKCS#11 PIN file")
        pin = config.pin_file.read_text(encoding="utf-8").strip()
        where = f"PIN file {config.pin_file}"
    else:
        pin = os.environ.get(config.pin_env, "")
        where = f"environment variable {config.pin_env}"
    if not pin:
        raise KeystoreError(f"PKCS#11 user PIN: {where} is empty or unset")
    return pin
