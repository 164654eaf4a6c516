"""A keystore "site" for tests: a configuration file and a state directory, on either backend."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.config import load
from gateway.keys import Keystore, open_keystore
from tests.softhsm import SoftHsm

MINIMAL = """
[models.echo]
engine = "echo"

[tenants.acme]
models = ["echo"]
"""


@dataclass(frozen=True)
class Site:
    """A configuration file and state directory, as an operator's CLI and gateway would share them."""

    backend: str
    config: Path
    state_dir: Path

    def open(self) -> Keystore:
        cfg = load(self.config, state_dir=self.state_dir)
        return open_keystore(cfg.keys, cfg.state_dir)

    @property
    def store(self) -> Path:
        return self.state_dir / "keys" / "keystore.json"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", "import sys; from control.cli import main; sys.exit(main())", *args,
             "--config", str(self.config), "--state-dir", str(self.state_dir)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    def entries(self) -> list[dict[str, object]]:
        return list(json.loads(self.store.read_text())["keys"])

    def rewrite(self, change: Callable[[list[dict[str, object]]], None]) -> None:
        raw = json.loads(self.store.read_text())
        change(raw["keys"])
        self.store.write_text(json.dumps(raw))


def make_site(request: pytest.FixtureRequest, tmp_path: Path) -> Site:
    """A site of the backend the (parametrized) request names; "pkcs11" uses the session's token."""
    keys = ""
    if request.param == "pkcs11":
        softhsm: SoftHsm = request.getfixturevalue("softhsm")
        keys = softhsm.toml()
    config = tmp_path / "airlock.toml"
    config.write_text(textwrap.dedent(MINIMAL) + keys)
    return Site(request.param, config, tmp_path / "state")
