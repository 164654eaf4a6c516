"""Token lifetimes are capped and token times are numbers (issue 15, item 8); claims that reach logs,
audit records and metrics are bounded (item 2's identity part).

`exp`, `iat` and `nbf` must be JSON numbers (a string or a boolean is refused, where PyJWT alone
reads `"exp": "99999999999"` as a time); `exp - iat` may not exceed `auth.max_token_lifetime_seconds`
(24 h by default); `sub` is 1..256 printable characters. `airlock token --ttl` refuses what the
gateway would refuse.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from airlock import AirlockError, AsyncClient
from control.tokens import mint_dev_token
from gateway.config import AuthConfig
from tests.support import LiveStack

DAY = 86400


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def dev_signed(stack: LiveStack, sub: str = "tester", **overrides: Any) -> str:
    """A token signed with the real dev key: valid unless an override makes it otherwise."""
    now = int(time.time())
    claims: dict[str, Any] = {"iss": "airlock-dev", "aud": "airlock", "sub": sub, "tenant": "acme",
                              "roles": ["user"], "iat": now, "nbf": now, "exp": now + 600}  # fmt: skip
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}
    key = serialization.load_pem_private_key(stack.pki.jwt_key.read_bytes(), password=None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    header = {"alg": "EdDSA", "typ": "JWT", "kid": stack.pki.jwt_kid}
    text = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{text}.{b64(key.sign(text.encode()))}"


async def outcome(stack: LiveStack, token: str) -> str:
    try:
        async with AsyncClient(stack.address, ca_cert=stack.pki.ca_cert, token=token, timeout=10) as c:
            await c.generate("hi", model="echo")
    except AirlockError as exc:
        return exc.reason
    return "OK"


def _now() -> int:
    return int(time.time())


# Each case: the claims it overrides (made when the test runs: a suite may start minutes later), and
# the reason it is refused for.
CASES: dict[str, tuple[Callable[[], dict[str, Any]], str]] = {
    # the reported ones: a lifetime of ~3 trillion years, and a time that is a string
    "exp-1e20": (lambda: {"exp": 10**20}, "TOKEN_LIFETIME_TOO_LONG"),
    "exp-string": (lambda: {"exp": str(_now() + 600)}, "TOKEN_CLAIM_INVALID"),
    "exp-string-far": (lambda: {"exp": "99999999999"}, "TOKEN_CLAIM_INVALID"),
    "exp-true": (lambda: {"exp": True}, "TOKEN_CLAIM_INVALID"),
    "exp-list": (lambda: {"exp": [_now() + 600]}, "TOKEN_CLAIM_INVALID"),
    "exp-too-big-for-a-float": (lambda: {"exp": 10**400}, "TOKEN_CLAIM_INVALID"),
    "iat-string": (lambda: {"iat": str(_now())}, "TOKEN_CLAIM_INVALID"),
    "iat-false": (lambda: {"iat": False}, "TOKEN_CLAIM_INVALID"),
    "nbf-string": (lambda: {"nbf": str(_now())}, "TOKEN_CLAIM_INVALID"),
    "nbf-true": (lambda: {"nbf": True}, "TOKEN_CLAIM_INVALID"),
    "a-day-and-a-second": (lambda: {"iat": _now() - 1, "exp": _now() + DAY}, "TOKEN_LIFETIME_TOO_LONG"),
    # an old iat cannot stretch a token either: the lifetime is exp - iat, whatever nbf says
    "old-iat-short-exp-left": (
        lambda: {"iat": _now() - 2 * DAY, "nbf": _now(), "exp": _now() + 60},
        "TOKEN_LIFETIME_TOO_LONG",
    ),
    "sub-too-long": (lambda: {"sub": "a" * 257}, "TOKEN_CLAIM_INVALID"),
    "sub-with-a-newline": (lambda: {"sub": 'tester\n{"event":"forged"}'}, "TOKEN_CLAIM_INVALID"),
    "sub-with-an-escape": (lambda: {"sub": "tester\x1b[2J"}, "TOKEN_CLAIM_INVALID"),
    "sub-a-number": (lambda: {"sub": 42}, "TOKEN_CLAIM_INVALID"),
    "roles-too-many": (lambda: {"roles": ["user"] * 65}, "TOKEN_CLAIM_INVALID"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_a_token_with_bad_times_or_unbounded_claims_is_refused(
    echo_stack: LiveStack, case: str
) -> None:
    overrides, reason = CASES[case]
    assert await outcome(echo_stack, dev_signed(echo_stack, **overrides())) == reason


async def test_a_token_at_the_cap_is_accepted(echo_stack: LiveStack) -> None:
    now = _now()
    assert await outcome(echo_stack, dev_signed(echo_stack, iat=now, exp=now + DAY)) == "OK"
    assert await outcome(echo_stack, dev_signed(echo_stack, iat=now, exp=now + 600.5, nbf=now - 0.5)) == "OK"
    assert await outcome(echo_stack, dev_signed(echo_stack, nbf=None)) == "OK"  # nbf stays optional
    assert await outcome(echo_stack, dev_signed(echo_stack, sub="t" * 256)) in ("OK", "POLICY_DENIED")


async def test_the_cap_is_configurable(make_stack: Any) -> None:
    from tests.conftest import ECHO_TOML, NO_LOCKOUT

    stack: LiveStack = make_stack(ECHO_TOML + NO_LOCKOUT + "\n[auth]\nmax_token_lifetime_seconds = 300\n")
    now = _now()
    assert await outcome(stack, dev_signed(stack, iat=now, exp=now + 300)) == "OK"
    assert await outcome(stack, dev_signed(stack, iat=now, exp=now + 301)) == "TOKEN_LIFETIME_TOO_LONG"
    assert await outcome(stack, stack.token("acme", ttl_seconds=300)) == "OK"
    with pytest.raises(ValueError, match="max_token_lifetime_seconds"):
        stack.token("acme", ttl_seconds=301)


def test_dev_tokens_stay_within_the_cap(echo_stack: LiveStack) -> None:
    auth = echo_stack.config.auth
    token = mint_dev_token(echo_stack.pki, auth, tenant="acme", subject="tester")
    payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert 0 < payload["exp"] - payload["iat"] <= auth.max_token_lifetime_seconds
    assert all(type(payload[c]) is int for c in ("exp", "iat", "nbf"))
    with pytest.raises(ValueError):
        mint_dev_token(echo_stack.pki, AuthConfig(), tenant="acme", subject="tester", ttl_seconds=DAY + 1)


@pytest.mark.parametrize("ttl", ["0", "-5", str(DAY + 1)])
def test_airlock_token_refuses_a_ttl_the_gateway_would_refuse(echo_stack: LiveStack, ttl: str) -> None:
    code = "from control.cli import main; raise SystemExit(main())"
    args = ["token", "--tenant", "acme", "--subject", "tester", "--ttl", ttl,
            "--state-dir", str(echo_stack.config.state_dir)]  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert "--ttl must be 1..86400" in done.stderr
    fine = subprocess.run([sys.executable, "-c", code, *args[:-3], "60", *args[-2:]], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert fine.returncode == 0 and fine.stdout.count(".") == 2
