"""Zero egress: the whole stack (real processes, the real bundled model) in a network namespace with
only loopback serves a request, and no process attempted a non-loopback connection or name lookup.

Two independent witnesses: a Python audit hook installed in every process (tests/egress/hook) logs
every socket connect/send/lookup made from Python (transformers, huggingface_hub, anything we import),
and the kernel's own TCP table in the namespace covers gRPC's C sockets. A deliberate connection to
a TEST-NET address proves the hook records and the namespace has no route."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_policy_dir

ROOT = Path(__file__).resolve().parents[2]
HOOK_DIR = ROOT / "tests" / "egress" / "hook"
CONTROL = "192.0.2.1"


def loopback(target: Any, family: int | None) -> bool:
    if family == socket.AF_UNIX or (isinstance(target, str) and target.startswith("/")):
        return True
    host = target[0] if isinstance(target, list | tuple) else target
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False  # a name other than localhost: a lookup that could leave the host


def local_peer(text: str) -> bool:
    """A TCP peer in the kernel's table: loopback, or unspecified (a listening socket)."""
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback or address.is_unspecified


@pytest.mark.slow
def test_the_stack_serves_with_only_loopback_and_attempts_no_egress(state_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "airlock.toml"
    config.write_text(textwrap.dedent(f"""
        policy_dir = "{make_policy_dir(tmp_path / "policy")}"

        [models.smollm2]
        engine = "transformers"
        path = "bundled"

        [tenants.acme]
        models = ["smollm2"]
    """))  # fmt: skip
    egress_log = tmp_path / "egress.jsonl"
    env = {**os.environ, "AIRLOCK_EGRESS_LOG": str(egress_log),
           "PYTHONPATH": os.pathsep.join([str(HOOK_DIR), str(ROOT)])}  # fmt: skip
    command = ["-m", "tests.egress.run_in_netns", str(config), str(state_dir), str(tmp_path / "run")]
    run = subprocess.run(
        [sys.executable, *command],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if run.returncode == 77:
        pytest.skip(f"no network namespace can be made here: {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])

    assert result["interfaces"] == ["lo"]
    assert result["answer_tokens"] > 0  # a real request was served by the model, in the namespace
    assert result["control_errno"] == result["enetunreach"]  # no route out
    assert result["tcp_peers"] and all(map(local_peer, result["tcp_peers"])), result["tcp_peers"]

    events = [json.loads(line) for line in egress_log.read_text().splitlines()]
    installed = [e["cmdline"] for e in events if e["event"] == "hook.installed"]
    assert any("-m tests.egress.run_in_netns" in c for c in installed)
    assert any("-m gateway" in c for c in installed)
    assert any("-m worker" in c for c in installed)  # the hook ran in every process of the stack
    attempts = [e for e in events if e["event"] != "hook.installed"]
    control = [e for e in attempts if CONTROL in json.dumps(e.get("target"))]
    assert [e["event"] for e in control] == ["socket.connect"]  # the hook does see connections
    outside = [e for e in attempts if e not in control and not loopback(e.get("target"), e.get("family"))]
    assert outside == []
