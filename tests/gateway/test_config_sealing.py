"""[sealing]: defaults, and bad values refused with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import config as config_mod
from tests.config_files import MINIMAL, load_config


def load(tmp_path: Path, extra: str) -> config_mod.Config:
    return load_config(tmp_path, extra, MINIMAL)


def test_defaults_offer_the_post_quantum_hybrid(tmp_path: Path) -> None:
    sealing = load(tmp_path, "").sealing
    assert (sealing.hpke_suite, sealing.reattest_seconds) == ("mlkem768-x25519", 600.0)


@pytest.mark.parametrize(
    ("toml", "key"),
    [('[sealing]\nhpke_suite = "rsa"\n', "sealing.hpke_suite"),
     ("[sealing]\nreattest_seconds = 0\n", "sealing.reattest_seconds"),
     ("[sealing]\nunknown = 1\n", "sealing.unknown")],
)  # fmt: skip
def test_bad_values_are_refused(tmp_path: Path, toml: str, key: str) -> None:
    with pytest.raises(config_mod.ConfigError, match=key.replace(".", r"\.")):
        load(tmp_path, toml)
