"""The audit trail of a live stack: it verifies, it never holds a payload or a secret, and a gateway
whose audit log can't be written refuses calls (fails closed) and says why in its log."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from airlock import PermissionDeniedError, UnavailableError
from control.audit_verify import load_public_key, verify_log
from control.cli import main
from control.tokens import mint_dev_token
from tests.conftest import ECHO_TOML
from tests.support import DOORS, LiveStack


def files_under(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


@pytest.mark.parametrize("door", DOORS)
async def test_no_payload_reaches_any_file_and_the_trail_verifies(
    make_stack: Callable[[str], LiveStack], tmp_path: Path, door: str
) -> None:
    audit = tmp_path / "trail" / "gateway.jsonl"
    stack = make_stack(ECHO_TOML + f'\n[audit]\npath = "{audit}"\nfsync = "always"\n')
    canary = f"canary-{uuid.uuid4().hex}"
    answer = await stack.generate(door, stack.token("acme"), prompt=f"please repeat {canary} twice")
    assert canary in answer  # the payload really went through the stack
    assert canary in await _streamed(stack, door, f"{canary} streamed")
    stranger = mint_dev_token(stack.pki, stack.config.auth, tenant="acme", subject="stranger")  # no role
    with pytest.raises(PermissionDeniedError):
        await stack.generate(door, stranger, prompt=f"denied {canary}")
    stack.stack.stop(timeout=10)  # flush and sign at close
    records = audit.read_text().splitlines()
    assert any('"decision":"allow"' in r for r in records) and any('"decision":"deny"' in r for r in records)
    report = verify_log(audit, load_public_key(stack.pki.audit_pub))
    assert report.ok, report.problems
    assert report.unsigned_tail == 0  # the gateway signed its head when it stopped
    # The supervisor's trail (domain scrubs, restarts) sits beside it, chained and signed alike.
    supervisor = verify_log(audit.with_name("supervisor.jsonl"), load_public_key(stack.pki.audit_pub))
    assert supervisor.ok and supervisor.records > 0 and supervisor.unsigned_tail == 0, supervisor.problems
    assert stack.stack.gateway is not None  # and said so in its log, the off-host witness
    assert f"audit chain head signed: seq {report.last_seq} " in stack.stack.gateway.log.read_text()
    everything = files_under(stack.config.state_dir, tmp_path)
    weights = [p for p in everything if p.suffix == ".safetensors"]  # model weights written before this test
    scanned = [p for p in everything if p not in weights]
    assert audit in scanned and stack.stack.gateway is not None and stack.stack.gateway.log in scanned
    needle = canary.encode()
    leaks = [p for p in scanned if needle in p.read_bytes()]
    assert leaks == []


async def _streamed(stack: LiveStack, door: str, prompt: str) -> str:
    if door == "grpc":
        async with stack.client("acme") as client:
            return "".join([c.text async for c in client.stream(prompt, model="echo")])
    async with stack.openai("acme") as client:
        stream = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": prompt}], stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def test_a_gateway_that_cannot_audit_refuses_calls(
    make_stack: Callable[[str], LiveStack], tmp_path: Path
) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "gateway.jsonl").symlink_to("/dev/full")  # every write fails with ENOSPC: a full disk
    stack = make_stack(ECHO_TOML + f'\n[audit]\npath = "{full / "gateway.jsonl"}"\n')
    async with stack.client("acme") as client:
        for _ in range(2):  # the first failure and every call after it
            with pytest.raises(UnavailableError) as refused:
                await client.generate("hello", model="echo")
            assert refused.value.reason == "AUDIT_UNAVAILABLE"
            assert "audit log unavailable" in str(refused.value)
    assert stack.stack.gateway is not None
    log = stack.stack.gateway.log.read_text()
    assert "audit log unavailable: No space left on device" in log
    # Health checks and balancers are told too: the gateway no longer reports SERVING.
    probe = ["health", "--address", stack.address, "--state-dir", str(stack.config.state_dir)]
    for _ in range(100):  # the status is set on the gateway's loop right after the failure
        if main(probe) == 1:
            break
        await asyncio.sleep(0.1)
    assert main(probe) == 1
