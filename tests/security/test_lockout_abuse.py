"""Lockouts can't be turned against someone else, and operators can lift them (issue 15, item 1).

A token counts against nobody until its signature verifies: forged tokens that name a real user
count against the address they came from, and that address's lockout never refuses a valid
credential (behind NAT or a balancer, everyone shares the address). A verified identity is locked
out only for its own policy denials. `airlock lockout list|clear` shows and lifts both, through the
gateway's admin socket; every clear is audited.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from airlock import AirlockError, AsyncClient
from control.pki import issue_service_cert
from control.tokens import mint_dev_token
from tests.conftest import ECHO_TOML
from tests.support import LiveStack

ATTACKER = ed25519.Ed25519PrivateKey.generate()  # the attacker's own key: in no JWKS


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(stack: LiveStack, sub: str, tenant: str = "acme") -> str:
    """A token naming `tenant`/`sub` with the dev issuer's real `kid`, signed by the attacker."""
    now = int(time.time())
    header = {"alg": "EdDSA", "typ": "JWT", "kid": stack.pki.jwt_kid}
    payload = {"iss": "airlock-dev", "aud": "airlock", "sub": sub, "tenant": tenant, "roles": ["user"],
               "iat": now, "exp": now + 600, "jti": os.urandom(8).hex()}  # fmt: skip
    text = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{text}.{b64(ATTACKER.sign(text.encode()))}"


async def outcome(stack: LiveStack, token: str | None, *, address: str | None = None, **options: Any) -> str:
    """The refusal's reason, or "OK" when the call is served."""
    try:
        async with AsyncClient(address or stack.address, ca_cert=stack.pki.ca_cert, token=token,
                               timeout=10, **options) as client:  # fmt: skip
            await client.generate("hi", model="echo")
    except AirlockError as exc:
        return exc.reason
    return "OK"


def lockout_cli(stack: LiveStack, *args: str) -> subprocess.CompletedProcess[str]:
    """`airlock lockout ...` as an operator runs it, against this stack's admin socket."""
    socket = stack.stack.admin_socket
    assert socket is not None
    code = "from control.cli import main; raise SystemExit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, "lockout", *args, "--socket", socket],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def table(listing: str) -> dict[str, list[str]]:
    """`airlock lockout list` output: key -> [kind, seconds left, failures]."""
    lines = listing.strip().splitlines()
    assert lines[0].split() == ["KEY", "KIND", "SECONDS", "LEFT", "FAILURES"], listing
    return {line.split()[0]: line.split()[1:] for line in lines[1:]}


def audit_since(stack: LiveStack, mark: int, **match: object) -> list[dict[str, Any]]:
    return [r for r in stack.audit_records(**match) if r["seq"] > mark]


def last_seq(stack: LiveStack) -> int:
    records = stack.audit_records()
    return int(records[-1]["seq"]) if records else 0


async def test_forged_tokens_naming_a_user_never_lock_that_user_out(
    make_stack: Callable[[str], LiveStack],
) -> None:
    stack = make_stack(ECHO_TOML)  # the default lockouts: 10 denials per identity, 100 failures per peer
    mark = last_seq(stack)
    victim = stack.token("acme")  # acme/tester, granted by the test policy
    assert await outcome(stack, victim) == "OK"  # verified once: now in the gateway's token cache

    # The attack of issue 15: ten tokens signed with the attacker's own key, carrying the real
    # kid and the victim's tenant and sub, all from the victim's address (one NAT, one balancer).
    for _ in range(10):
        assert await outcome(stack, forged(stack, "tester")) == "TOKEN_BAD_SIGNATURE"

    # The victim's token, already verified, and a new one both still work.
    assert await outcome(stack, victim) == "OK"
    assert await outcome(stack, stack.token("acme")) == "OK"
    assert await outcome(stack, forged(stack, "tester")) == "TOKEN_BAD_SIGNATURE"  # not locked either
    lockouts = audit_since(stack, mark, event="lockout")
    assert lockouts == [], "nobody was locked out: ten failures are under the peer threshold"
    assert "acme/tester" not in lockout_cli(stack, "list").stdout


async def test_a_locked_peer_never_refuses_a_valid_credential(
    make_stack: Callable[[str], LiveStack], tmp_path: Path
) -> None:
    stack = make_stack(ECHO_TOML + "\n[lockout]\nmax_auth_failures_per_peer = 5\n")
    mark = last_seq(stack)
    cached = stack.token("acme")
    assert await outcome(stack, cached) == "OK"
    for _ in range(5):
        assert await outcome(stack, forged(stack, "tester")) == "TOKEN_BAD_SIGNATURE"

    # 127.0.0.1 is locked out now: calls that would fail anyway say only LOCKED_OUT...
    assert await outcome(stack, forged(stack, "tester")) == "LOCKED_OUT"
    assert await outcome(stack, "not-a-jwt") == "LOCKED_OUT"
    assert await outcome(stack, None) == "LOCKED_OUT"
    expired = mint_dev_token(stack.pki, stack.config.auth, tenant="acme", subject="tester", ttl_seconds=-600)
    assert await outcome(stack, expired) == "LOCKED_OUT"
    # ...and every valid credential from the same address is served: a cached token, tokens the
    # gateway never saw (each verified in full), another tenant's, a service certificate.
    assert await outcome(stack, cached) == "OK"
    assert await outcome(stack, stack.token("acme")) == "OK"
    assert await outcome(stack, stack.token("globex")) == "OK"
    batch = issue_service_cert(stack.pki, tenant="acme", service="batch", out_dir=tmp_path)
    mtls = stack.stack.mtls_address
    assert await outcome(stack, None, address=mtls, client_cert=batch.cert, client_key=batch.key) == "OK"

    locked = audit_since(stack, mark, event="lockout")
    assert [(r["kind"], r["key"]) for r in locked] == [("authentication", "peer:127.0.0.1")]
    refused = audit_since(stack, mark, event="authentication", reason="LOCKED_OUT")
    assert {r.get("cause") for r in refused} == {"TOKEN_BAD_SIGNATURE", "TOKEN_MALFORMED",
                                                 "TOKEN_MISSING", "TOKEN_EXPIRED"}  # fmt: skip

    listing = lockout_cli(stack, "list")
    assert listing.returncode == 0, listing.stderr
    rows = table(listing.stdout)
    assert rows["peer:127.0.0.1"][0] == "peer" and 0 < int(rows["peer:127.0.0.1"][1]) <= 300
    assert rows["peer:127.0.0.1"][2] == "5"
    assert not [key for key in rows if key.startswith("subject:")]

    cleared = lockout_cli(stack, "clear", "--peer", "127.0.0.1")
    assert cleared.returncode == 0 and "cleared peer:127.0.0.1" in cleared.stdout, cleared.stderr
    assert await outcome(stack, forged(stack, "tester")) == "TOKEN_BAD_SIGNATURE"
    clears = audit_since(stack, mark, event="lockout_cleared")
    assert [(r["target"], r["value"], r["cleared"]) for r in clears] == [("peer", "127.0.0.1", 1)]


async def test_a_users_own_denials_lock_only_that_user_until_an_operator_clears_it(
    make_stack: Callable[[str], LiveStack],
) -> None:
    stack = make_stack(ECHO_TOML + "\n[lockout]\nmax_failures = 3\n")
    mark = last_seq(stack)
    stranger = mint_dev_token(stack.pki, stack.config.auth, tenant="acme", subject="stranger")  # no role
    assert [await outcome(stack, stranger) for _ in range(4)] == ["POLICY_DENIED"] * 3 + ["LOCKED_OUT"]
    assert await outcome(stack, stack.token("acme")) == "OK"  # the same address, another identity

    rows = table(lockout_cli(stack, "list").stdout)
    assert rows["subject:acme/stranger"][0] == "subject" and rows["subject:acme/stranger"][2] == "3"

    nothing = lockout_cli(stack, "clear", "--subject", "acme/nobody")
    assert nothing.returncode == 0 and "nothing to clear" in nothing.stdout
    cleared = lockout_cli(stack, "clear", "--subject", "acme/stranger")
    assert cleared.returncode == 0 and "cleared subject:acme/stranger" in cleared.stdout, cleared.stderr
    assert await outcome(stack, stranger) == "POLICY_DENIED"  # back to the policy's own answer
    assert lockout_cli(stack, "clear", "--all").returncode == 0
    assert lockout_cli(stack, "list").stdout.strip() == "no lockouts and no recent failures"

    clears = audit_since(stack, mark, event="lockout_cleared")
    assert [(r["target"], r["value"], r["cleared"]) for r in clears] == [
        ("subject", "acme/nobody", 0), ("subject", "acme/stranger", 1), ("all", None, 1),
    ]  # fmt: skip
    assert all(r["via"] == "admin-socket" and r["request_id"] for r in clears)

    # Bad usage is refused before anything is asked; a value the gateway would never make too.
    assert lockout_cli(stack, "clear").returncode == 2
    bad = lockout_cli(stack, "clear", "--subject", "acme/x\x1b[2J")
    assert bad.returncode == 1 and "printable" in bad.stderr


async def test_the_admin_socket_is_private_and_not_on_any_network_port(
    make_stack: Callable[[str], LiveStack],
) -> None:
    from airlock.v1 import admin_pb2, admin_pb2_grpc  # here: the attack tests above run on any version

    stack = make_stack(ECHO_TOML)
    socket = stack.stack.admin_socket
    assert socket is not None
    info, parent = os.stat(socket), os.stat(Path(socket).parent)
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert stat.S_IMODE(parent.st_mode) == 0o700 and parent.st_uid == info.st_uid == os.geteuid()

    # The public ports know no Admin service, whatever the credential.
    credentials = grpc.ssl_channel_credentials(stack.pki.ca_cert.read_bytes())
    async with grpc.aio.secure_channel(stack.address, credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin_pb2_grpc.AdminStub(channel).ListLockouts(
                admin_pb2.ListLockoutsRequest(), timeout=10,
                metadata=(("authorization", f"Bearer {stack.token('acme')}"),),
            )  # fmt: skip
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED

    # The gateway removes its socket when it stops.
    gateway = stack.stack.gateway
    assert gateway is not None
    stack.stack.stop(timeout=5)
    assert not Path(socket).exists()


async def test_airlock_lockout_finds_the_socket_of_airlock_up_from_the_configuration(tmp_path: Path) -> None:
    # As `airlock up` runs it: the run directory (and the socket) under the state directory.
    from control.launcher import Stack
    from gateway import config as config_mod
    from tests.conftest import make_policy_dir

    config = tmp_path / "airlock.toml"
    config.write_text(f'policy_dir = "{make_policy_dir(tmp_path / "policy")}"\n' + ECHO_TOML)
    state = tmp_path / "state"
    code = "from control.cli import main; raise SystemExit(main())"
    listing = [
        sys.executable,
        "-c",
        code,
        "lockout",
        "list",
        "--config",
        str(config),
        "--state-dir",
        str(state),
    ]
    stack = Stack(config_mod.load(config, state_dir=state), listen="127.0.0.1:0")
    stack.start(timeout=300)
    try:
        assert stack.admin_socket == str(state / "run" / "gateway-admin.sock")
        done = subprocess.run(listing, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0 and done.stdout.strip() == "no lockouts and no recent failures", (
            done.stderr
        )
    finally:
        stack.stop(timeout=5)
    gone = subprocess.run(listing, capture_output=True, text=True, timeout=60, check=False)
    assert gone.returncode == 1 and "no gateway answers" in gone.stderr
