"""The architecture's rules hold: the import contracts pass, they fail on a violation, the SDK loads
alone, and the CLI starts without what a command doesn't use."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("airlock", "serving", "gateway", "control", "worker")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300, check=False,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def test_the_import_contracts_hold() -> None:
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("gateway/main.py", "import control.pki", "the gateway never imports control"),
        ("gateway/server.py", "import worker.server", "The gateway and the worker meet only over gRPC"),
        ("airlock/client.py", "import serving.rpc", "The SDK imports nothing else of ours"),
        ("worker/server.py", "import torch", "torch, transformers, vLLM and numpy only in"),
    ],
)
def test_a_violation_fails_the_lint(tmp_path: Path, module: str, line: str, contract: str) -> None:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # a deliberate violation\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0, done.stdout
    assert contract in done.stdout and "BROKEN" in done.stdout


def test_the_base_install_is_the_sdk_alone() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip() for d in project["dependencies"]}
    assert names == {"grpcio", "grpcio-status", "protobuf", "cryptography"}
    assert not any(
        "torch" in d for extra in project["optional-dependencies"].values() for d in extra if "==" in d
    )


def test_the_sdk_runs_without_any_server_package() -> None:
    """The SDK, imported and used with every server-side dependency made unimportable."""
    blocked = ["torch", "transformers", "redis", "casbin", "jwt", "yaml", "watchfiles", "prometheus_client",
               "numpy", "serving", "gateway", "control", "worker", "grpc_health",
               "grpc_reflection"]  # fmt: skip
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import airlock
from airlock import AsyncClient, Client, AirlockError
from airlock.e2e import EndToEnd
from airlock.attestation import AttestationPolicy
client = Client("127.0.0.1:1", token="x.eyJleHAiOiAxfQ.y")
client.close()
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_keys_list_loads_no_launcher_policy_engine_or_redis(tmp_path: Path) -> None:
    code = (
        "import sys\nfrom control.cli import main\n"
        f"assert main(['keys', 'list', '--state-dir', {str(tmp_path)!r}]) == 0\n"
        "heavy = ('redis', 'casbin', 'control.launcher', 'control.supervisor', 'torch')\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_cli_spells_the_policy_actions() -> None:
    from control.cli import POLICY_ACTIONS
    from gateway.policy.rules import ACTIONS

    assert tuple(a for a in ACTIONS if a != "*") == POLICY_ACTIONS
