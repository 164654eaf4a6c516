"""A SoftHSM2 token of its own for tests: a private softhsm2.conf and token directory in a temp dir.

SoftHSM2 reads SOFTHSM2_CONF when the PKCS#11 module is initialised, once per process, so the
session fixture sets it before anything loads the module; subprocesses inherit it.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from gateway.keys.pkcs11 import find_module

TOKEN_LABEL = "airlock-test"
USER_PIN = "4711-user-pin"
SO_PIN = "0815-so-pin"


@dataclass(frozen=True)
class SoftHsm:
    conf: Path
    module: Path
    token_label: str
    pin_file: Path

    def toml(self) -> str:
        """The `[keys]` section of a configuration that uses this token."""
        return (
            f'[keys]\nbackend = "pkcs11"\n[keys.pkcs11]\nmodule = "{self.module}"\n'
            f'token_label = "{self.token_label}"\npin_file = "{self.pin_file}"\n'
        )


def unavailable() -> str | None:
    """Why SoftHSM2 can't be used here, or None."""
    if shutil.which("softhsm2-util") is None or find_module() is None:
        return "softhsm2 is not installed (scripts/bootstrap.sh installs it with apt as root)"
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        return "python-pkcs11 is not installed (the dev extra has it)"
    return None


def make_token(directory: Path) -> SoftHsm:
    tokens = directory / "tokens"
    tokens.mkdir(parents=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", TOKEN_LABEL, "--pin", USER_PIN,
         "--so-pin", SO_PIN],
        env={"SOFTHSM2_CONF": str(conf), "PATH": "/usr/bin:/bin"},
        check=True, capture_output=True,
    )  # fmt: skip
    pin_file = directory / "user.pin"
    pin_file.write_text(USER_PIN + "\n")
    pin_file.chmod(0o600)
    module = find_module()
    assert module is not None
    return SoftHsm(conf, module, TOKEN_LABEL, pin_file)
