"""`Pkcs11Keystore` against SoftHSM2: the tenant KEK stays inside the token; PIN handling."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Pkcs11KeysConfig
from gateway.keys.pkcs11 import Pkcs11Keystore, kek_label
from gateway.keys.store import KeystoreError
from tests.softhsm import USER_PIN, SoftHsm


def config(softhsm: SoftHsm, **changes: Any) -> Pkcs11KeysConfig:
    base = Pkcs11KeysConfig(module=softhsm.module, token_label=softhsm.token_label, pin_file=softhsm.pin_file)
    return dataclasses.replace(base, **changes)


def test_the_tenant_kek_cannot_be_read_or_extracted(softhsm: SoftHsm, tmp_path: Path) -> None:
    import pkcs11
    from pkcs11 import Attribute, KeyType, MechanismFlag, ObjectClass

    ks = Pkcs11Keystore.from_config(config(softhsm), tmp_path / "keystore.json")
    ks.create("kek-probe")
    lib = pkcs11.lib(str(softhsm.module))
    with lib.get_token(token_label=softhsm.token_label).open(rw=True, user_pin=USER_PIN) as session:
        keks = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY,
                                         Attribute.LABEL: kek_label("kek-probe")}))  # fmt: skip
        assert len(keks) == 1
        kek = keks[0]
        assert kek[Attribute.SENSITIVE] is True
        assert kek[Attribute.EXTRACTABLE] is False
        assert kek[Attribute.NEVER_EXTRACTABLE] is True
        assert kek[Attribute.LOCAL] is True  # generated inside the token, never imported
        assert kek[Attribute.TOKEN] is True and kek[Attribute.PRIVATE] is True
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            kek[Attribute.VALUE]
        wrapper = session.generate_key(KeyType.AES, 256, capabilities=MechanismFlag.WRAP)
        with pytest.raises(pkcs11.exceptions.KeyUnextractable):
            wrapper.wrap_key(kek)
        wrapper.destroy()
        with pytest.raises(pkcs11.exceptions.PKCS11Error):  # and it can't be made extractable
            kek[Attribute.EXTRACTABLE] = True
        assert kek[Attribute.EXTRACTABLE] is False
        # The keystore works while another session of this process is logged in (login is shared).
        assert len(ks.active("kek-probe")[1]) == 32
        # No data key is left behind in the token: they live there only while wrapped or unwrapped.
        stored = [o for o in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY})
                  if not str(o[Attribute.LABEL]).startswith("airlock-kek-")]  # fmt: skip
        assert stored == []


def test_a_wrong_pin_is_refused_without_echoing_it(softhsm: SoftHsm, tmp_path: Path) -> None:
    pin = tmp_path / "wrong.pin"
    pin.write_text("not-the-pin-1234")
    pin.chmod(0o600)
    with pytest.raises(KeystoreError, match="user PIN is wrong") as err:
        Pkcs11Keystore.from_config(config(softhsm, pin_file=pin), tmp_path / "keystore.json")
    assert "not-the-pin-1234" not in str(err.value)


def test_a_readable_pin_file_is_refused(softhsm: SoftHsm, tmp_path: Path) -> None:
    pin = tmp_path / "user.pin"
    pin.write_text(USER_PIN)
    pin.chmod(0o644)
    with pytest.raises(KeystoreError, match=r"PIN file .*user\.pin: mode 0644"):
        Pkcs11Keystore.from_config(config(softhsm, pin_file=pin), tmp_path / "keystore.json")


def test_the_pin_can_come_from_an_environment_variable(
    softhsm: SoftHsm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(softhsm, pin_file=None, pin_env="AIRLOCK_TEST_HSM_PIN")
    with pytest.raises(KeystoreError, match="AIRLOCK_TEST_HSM_PIN is empty or unset"):
        Pkcs11Keystore.from_config(cfg, tmp_path / "keystore.json")
    monkeypatch.setenv("AIRLOCK_TEST_HSM_PIN", USER_PIN)
    ks = Pkcs11Keystore.from_config(cfg, tmp_path / "keystore.json")
    assert ks.create("pin-env").backend == "pkcs11"


def test_an_unknown_token_or_module_is_a_clear_error(softhsm: SoftHsm, tmp_path: Path) -> None:
    with pytest.raises(KeystoreError, match="no token labelled 'no-such-token'"):
        Pkcs11Keystore.from_config(config(softhsm, token_label="no-such-token"), tmp_path / "k.json")
    with pytest.raises(KeystoreError, match=r"PKCS#11 module /nonexistent/lib\.so: no such file"):
        Pkcs11Keystore.from_config(config(softhsm, module=Path("/nonexistent/lib.so")), tmp_path / "k.json")


def test_a_store_whose_kek_is_gone_fails_clearly(softhsm: SoftHsm, tmp_path: Path) -> None:
    import pkcs11
    from pkcs11 import Attribute

    ks = Pkcs11Keystore.from_config(config(softhsm), tmp_path / "keystore.json")
    ks.create("kek-gone")
    lib = pkcs11.lib(str(softhsm.module))
    with lib.get_token(token_label=softhsm.token_label).open(rw=True, user_pin=USER_PIN) as session:
        for kek in session.get_objects({Attribute.LABEL: kek_label("kek-gone")}):
            kek.destroy()
    with pytest.raises(KeystoreError, match="has no key-encryption key for tenant 'kek-gone'"):
        Pkcs11Keystore.from_config(config(softhsm), tmp_path / "keystore.json").active("kek-gone")
