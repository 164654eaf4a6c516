"""`[keys]` in the configuration file: defaults, both backends, each refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import Config, ConfigError, FileKeysConfig, KeysConfig, Pkcs11KeysConfig, load
from tests.config_files import MINIMAL, load_config


def load_text(tmp_path: Path, text: str) -> Config:
    return load_config(tmp_path, MINIMAL, text)


def test_default_is_the_file_backend_under_the_state_dir(tmp_path: Path) -> None:
    assert load(None, state_dir=tmp_path).keys == KeysConfig(backend="file")
    assert load_text(tmp_path, "").keys == KeysConfig()


def test_a_full_file_table(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        """
        [keys]
        backend = "file"
        store = "/var/lib/airlock/keys.json"
        [keys.file]
        master_key = "/run/secrets/airlock-master.key"
        """,
    )
    assert cfg.keys == KeysConfig(
        backend="file",
        store=Path("/var/lib/airlock/keys.json"),
        file=FileKeysConfig(master_key=Path("/run/secrets/airlock-master.key")),
    )


def test_a_full_pkcs11_table(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        """
        [keys]
        backend = "pkcs11"
        [keys.pkcs11]
        module = "/opt/hsm/lib/libvendor-pkcs11.so"
        token_label = "airlock-prod"
        pin_env = "AIRLOCK_HSM_PIN"
        """,
    )
    assert cfg.keys.backend == "pkcs11"
    assert cfg.keys.pkcs11 == Pkcs11KeysConfig(
        module=Path("/opt/hsm/lib/libvendor-pkcs11.so"), token_label="airlock-prod", pin_env="AIRLOCK_HSM_PIN"
    )


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ('[keys]\nbackend = "vault"', "keys.backend", 'must be "file" or "pkcs11"'),
        ("[keys]\nmaster_key = 'x'", "keys.master_key", "unknown key"),
        ("[keys.file]\nkey = 'x'", "keys.file.key", "unknown key"),
        ('[keys]\nbackend = "pkcs11"\n[keys.pkcs11]\npin_env = "PIN"', "keys.pkcs11.token_label", "required"),
        ('[keys]\nbackend = "pkcs11"\n[keys.pkcs11]\ntoken_label = "t"', "keys.pkcs11", "exactly one"),
        (
            '[keys]\nbackend = "pkcs11"\n[keys.pkcs11]\ntoken_label = "t"\npin_env = "P"\npin_file = "/p"',
            "keys.pkcs11",
            "exactly one",
        ),
        ('[keys.pkcs11]\npin = "1234"', "keys.pkcs11.pin", "never the PIN itself"),
        ('[keys.pkcs11]\npin_env = "1234 x"', "keys.pkcs11.pin_env", "environment variable name"),
        ("[keys]\nstore = 3", "keys.store", "must be str"),
    ],
)
def test_refusals_name_the_key_and_the_reason(tmp_path: Path, text: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, text)
    assert err.value.key == key and reason in err.value.reason
    assert "1234" not in str(err.value)  # a PIN, even misplaced, is never echoed
