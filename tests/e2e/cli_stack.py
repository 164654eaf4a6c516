"""A stack started the way an operator starts one: `airlock up` (or `up --detach`) as a process on a
configuration file, found by its state directory's run file. Commands run as real processes too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from airlock import AsyncClient
from control.pki import DevPki
from control.tokens import mint_dev_token
from gateway.config import AuthConfig
from tests.conftest import make_policy_dir

AIRLOCK = [sys.executable, "-c", "import sys; from control.cli import main; sys.exit(main())"]

TOML = """
[gateway]
listen = "127.0.0.1:0"
mtls_listen = ""
metrics_listen = "127.0.0.1:0"
grace_seconds = 5
max_tokens = 512

[models.echo]
engine = "echo"
tokens_per_second = 100

[tenants.acme]
models = ["echo"]

[tenants.globex]
models = ["echo"]

[supervisor]
backoff_seconds = 0.2
health_interval_seconds = 1
arena_mb = 4
"""


class CliStack:
    """The files of one operator's stack (config, policy, state) and the commands run on them."""

    def __init__(self, root: Path, toml: str = TOML) -> None:
        self.root = root
        self.policy = make_policy_dir(root / "policy")
        self.config = root / "airlock.toml"
        self.config.write_text(f'policy_dir = "{self.policy}"\n' + textwrap.dedent(toml))
        self.state = root / "state"
        self.process: subprocess.Popen[bytes] | None = None
        self.output = root / "up.out"

    @property
    def common(self) -> list[str]:
        return ["--config", str(self.config), "--state-dir", str(self.state)]

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*AIRLOCK, *args, *self.common], capture_output=True, text=True, timeout=timeout, check=False
        )

    def up(self, timeout: float = 120) -> dict[str, Any]:
        """`airlock up` in the foreground (a child process), its output in `self.output`."""
        with self.output.open("wb") as out:
            self.process = subprocess.Popen(
                [*AIRLOCK, "up", *self.common], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        return self.wait_running(timeout)

    def wait_running(self, timeout: float = 120) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            info = self.info()
            if info is not None:
                return info
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"airlock up exited {self.process.returncode}:\n{self.output.read_text()}"
                )
            time.sleep(0.1)
        raise AssertionError(f"the stack did not come up:\n{self.output.read_text()}")

    def info(self) -> dict[str, Any] | None:
        try:
            info = json.loads((self.state / "run" / "stack.json").read_text())
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def printed(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def wait_printed(self, text: str, timeout: float = 60, log: Path | None = None) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            out = log.read_text(errors="replace") if log and log.exists() else self.printed()
            if text in out:
                return out
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not printed:\n{self.printed()}")

    @property
    def pki(self) -> DevPki:
        return DevPki(self.state / "pki")

    def token(self, tenant: str, subject: str = "tester") -> str:
        return mint_dev_token(self.pki, AuthConfig(), tenant=tenant, subject=subject)

    def client(self, tenant: str, **options: Any) -> AsyncClient:
        info = self.info()
        assert info is not None
        return AsyncClient(info["address"], token=self.token(tenant), ca_cert=self.pki.ca_cert, **options)

    def records(self, log: str = "gateway.jsonl") -> list[dict[str, Any]]:
        path = self.state / "audit" / log
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)
