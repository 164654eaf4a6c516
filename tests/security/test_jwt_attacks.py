"""Attacks on bearer JWTs against real gateway processes: each forged, stale or misdirected token is
refused with its exact status and stable reason, the tenant comes from the verified identity only,
issuers speak only for their tenants, JWKS files rotate without a restart, and no token leaks.

The shared echo stack has lockouts off (every test's refusals come from one peer, and failed
authentications count against the peer: tests/security/test_lockout_abuse.py).

The attacks run against both front doors (`door`: the gRPC door through the SDK, the HTTP door
through the official `openai` client): one guard behind both, so the same refusal with the same reason.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID
from jwt.algorithms import OKPAlgorithm

from airlock import (
    AirlockError,
    AsyncClient,
    AuthenticationError,
    InvalidRequestError,
    PermissionDeniedError,
)
from airlock.rpcstatus import from_rpc_error
from airlock.v1 import inference_pb2 as pb
from airlock.v1 import inference_pb2_grpc
from control.launcher import Stack
from control.pki import DevPki
from control.tokens import mint_dev_token
from gateway import config as config_mod
from tests.conftest import ECHO_TOML, NO_LOCKOUT, TEST_GRANTS, make_policy_dir
from tests.support import DOORS, LiveStack, http_error

DEV = "airlock-dev"
PARTNER = "partner-idp"
AUDIENCE = "airlock"
# Any base64url JSON object followed by a second segment: the shape of a JWT, whoever minted it.
JWT_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}")
RELOAD_WAIT_S = 15.0
BASIC_SECRET = "dXNlcjpzM2NyZXQtdmFsdWU="  # base64 of user:s3cret-value
NOT_A_JWT = "canary-not-a-jwt-5f2c9a"
SMALL_TOKEN_LIMIT = 4096  # the partner stack's max_token_bytes: well under gRPC's 8 KiB metadata limit


# --- minting -----------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(sub: str, /, **overrides: Any) -> dict[str, Any]:
    """A complete, valid claim set for acme on the dev issuer; an override of None drops the claim."""
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": DEV,
        "aud": AUDIENCE,
        "sub": sub,
        "tenant": "acme",
        "roles": ["user"],
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def signing_input(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"


def signed(key: ed25519.Ed25519PrivateKey, header: dict[str, Any], payload: dict[str, Any]) -> str:
    """EdDSA over exactly this header (jwt.encode would add or reorder fields)."""
    text = signing_input(header, payload)
    return f"{text}.{b64(key.sign(text.encode()))}"


def dev_key(pki: DevPki) -> ed25519.Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pki.jwt_key.read_bytes(), password=None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    return key


def dev_signed(pki: DevPki, payload: dict[str, Any], **header: Any) -> str:
    return signed(dev_key(pki), {"alg": "EdDSA", "typ": "JWT", "kid": pki.jwt_kid, **header}, payload)


def public_jwk(key: ed25519.Ed25519PrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update(kid=kid, alg="EdDSA", use="sig")
    return jwk


def self_signed_der(key: ed25519.Ed25519PrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "airlock-dev")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, None)
    )
    return cert.public_bytes(serialization.Encoding.DER)


ATTACKER = ed25519.Ed25519PrivateKey.generate()


def attacker_signed(payload: dict[str, Any], **header: Any) -> str:
    return signed(ATTACKER, {"alg": "EdDSA", "typ": "JWT", "kid": "attacker-1", **header}, payload)


def hs256_with(secret: bytes, header: dict[str, Any], payload: dict[str, Any]) -> str:
    text = signing_input(header, payload)
    return f"{text}.{b64(hmac.new(secret, text.encode(), hashlib.sha256).digest())}"


# --- calling -----------------------------------------------------------------------------------


def client(stack: LiveStack, token: str | None, tenant: str | None = None) -> AsyncClient:
    return AsyncClient(stack.address, ca_cert=stack.pki.ca_cert, token=token, tenant=tenant, timeout=10)


async def refused(
    stack: LiveStack, token: str, *, tenant: str | None = None, model: str = "echo", door: str = "grpc"
) -> AirlockError:
    with pytest.raises(AirlockError) as info:
        await stack.generate(door, token, tenant=tenant, model=model)
    return info.value


async def outcome(
    stack: LiveStack, token: str, *, tenant: str | None = None, model: str = "echo", door: str = "grpc"
) -> str:
    """The refusal's reason, or "OK" when the call is served."""
    try:
        await stack.generate(door, token, tenant=tenant, model=model)
    except AirlockError as exc:
        return exc.reason
    return "OK"


@pytest.fixture(params=DOORS)
def door(request: pytest.FixtureRequest) -> str:
    """The front door a test attacks: each such test runs against both."""
    return str(request.param)


async def eventually(stack: LiveStack, token: str, expected: str, timeout: float = RELOAD_WAIT_S) -> str:
    """Poll until the token's outcome is `expected` (a JWKS reload landed) or time runs out."""
    deadline = time.monotonic() + timeout
    while (got := await outcome(stack, token)) != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return got


async def raw_call(
    stack: LiveStack, metadata: tuple[tuple[str, str], ...], door: str = "grpc"
) -> AirlockError:
    """A call with hand-made metadata (the SDK only ever sends `Bearer`)."""
    if door == "http":
        import httpx2

        body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
        headers = [(k, v.strip()) for k, v in metadata]  # HTTP trims a value's surrounding spaces
        async with httpx2.AsyncClient(verify=stack.ssl_context(), timeout=10) as http:
            answer = await http.post(f"{stack.http_url}/v1/chat/completions", json=body, headers=headers)
        assert answer.status_code != 200
        return http_error(answer.status_code, answer.json())
    credentials = grpc.ssl_channel_credentials(stack.pki.ca_cert.read_bytes())
    async with grpc.aio.secure_channel(stack.address, credentials) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = pb.GenerateRequest(model="echo", messages=[pb.ChatMessage(role="user", content="hi")])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Generate(request, timeout=10, metadata=metadata)
    return from_rpc_error(info.value)


def assert_refusal(err: AirlockError, cls: type[AirlockError], reason: str, secret: str = "") -> None:
    assert type(err) is cls, f"{type(err).__name__}: {err}"
    assert err.reason == reason, str(err)
    if secret:
        for text in (err.message, str(err)):
            assert secret not in text
            assert not any(len(part) > 8 and part in text for part in re.split(r"[.\s]", secret))


def assert_no_leak(files: list[Path], secrets: list[str]) -> None:
    for path in files:
        text = path.read_text(errors="replace")
        assert text, f"{path} is empty: nothing to check"
        assert not JWT_SHAPE.search(text), f"{path} holds something shaped like a JWT"
        for secret in secrets:
            assert secret not in text, f"{path} holds a credential"
            for part in secret.split("."):
                assert len(part) <= 16 or part not in text, f"{path} holds part of a credential"


def audit_file(stack: LiveStack) -> Path:
    return stack.config.state_dir / "audit" / "gateway.jsonl"


def gateway_log(stack: LiveStack) -> Path:
    assert stack.stack.gateway is not None
    return stack.stack.gateway.log


# --- forged and broken tokens on the shared echo stack -----------------------------------------

Attack = Callable[[LiveStack], str]


def _hs256_over_public_key(
    label: str, encoding: serialization.Encoding, fmt: serialization.PublicFormat
) -> Attack:
    """Key confusion: an HMAC keyed with the issuer's public key, which is no secret."""

    def make(s: LiveStack) -> str:
        secret = dev_key(s.pki).public_key().public_bytes(encoding, fmt)
        header = {"alg": "HS256", "typ": "JWT", "kid": s.pki.jwt_kid}
        return hs256_with(secret, header, claims(f"atk-hs256-{label}"))

    return make


def _missing(claim: str) -> Attack:
    return lambda s: dev_signed(s.pki, claims(f"atk-missing-{claim}", **{claim: None}))


def _tampered(s: LiveStack) -> str:
    """A genuine acme token whose payload is swapped for one naming globex."""
    header, _, signature = dev_signed(s.pki, claims("atk-tamper")).split(".")
    return f"{header}.{b64(json.dumps(claims('atk-tamper', tenant='globex')).encode())}.{signature}"


def _leeway(s: LiveStack) -> int:
    return s.config.auth.leeway_seconds


ATTACKS: dict[str, tuple[Attack, str]] = {
    "alg-none": (
        lambda s: (
            signing_input({"alg": "none", "typ": "JWT", "kid": s.pki.jwt_kid}, claims("atk-none")) + "."
        ),
        "TOKEN_ALGORITHM_NOT_ALLOWED",
    ),
    "hs256-over-public-pem": (
        _hs256_over_public_key(
            "pem", serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "TOKEN_ALGORITHM_NOT_ALLOWED",
    ),
    "hs256-over-public-raw": (
        _hs256_over_public_key("raw", serialization.Encoding.Raw, serialization.PublicFormat.Raw),
        "TOKEN_ALGORITHM_NOT_ALLOWED",
    ),
    # ES256 is on the issuer's list, but the named key is Ed25519: the key decides, not the header.
    "alg-es256-on-ed25519-key": (
        lambda s: signed(
            dev_key(s.pki), {"alg": "ES256", "typ": "JWT", "kid": s.pki.jwt_kid}, claims("atk-es256")
        ),
        "TOKEN_KEY_MISMATCH",
    ),
    "embedded-jwk": (
        lambda s: attacker_signed(claims("atk-jwk"), jwk=public_jwk(ATTACKER, "attacker-1")),
        "TOKEN_HEADER_NOT_ALLOWED",
    ),
    "jku": (
        lambda s: attacker_signed(claims("atk-jku"), jku="https://attacker.example/jwks.json"),
        "TOKEN_HEADER_NOT_ALLOWED",
    ),
    "x5u": (
        lambda s: attacker_signed(claims("atk-x5u"), x5u="https://attacker.example/cert.pem"),
        "TOKEN_HEADER_NOT_ALLOWED",
    ),
    "x5c": (
        lambda s: attacker_signed(
            claims("atk-x5c"), x5c=[base64.b64encode(self_signed_der(ATTACKER)).decode()]
        ),
        "TOKEN_HEADER_NOT_ALLOWED",
    ),
    # Signed by the real key and otherwise valid: a critical extension alone refuses it.
    "crit": (
        lambda s: dev_signed(s.pki, claims("atk-crit"), crit=["urn:example:must-understand"]),
        "TOKEN_HEADER_NOT_ALLOWED",
    ),
    "crit-b64": (
        lambda s: dev_signed(s.pki, claims("atk-crit-b64"), b64=True, crit=["b64"]),
        "TOKEN_HEADER_NOT_ALLOWED",
    ),
    "unknown-kid": (lambda s: dev_signed(s.pki, claims("atk-kid"), kid="no-such-key"), "TOKEN_UNKNOWN_KEY"),
    "no-kid": (
        lambda s: signed(dev_key(s.pki), {"alg": "EdDSA", "typ": "JWT"}, claims("atk-no-kid")),
        "TOKEN_UNKNOWN_KEY",
    ),
    "dev-kid-other-key": (
        lambda s: attacker_signed(claims("atk-other-key"), kid=s.pki.jwt_kid),
        "TOKEN_BAD_SIGNATURE",
    ),
    "tampered-payload": (_tampered, "TOKEN_BAD_SIGNATURE"),
    "expired": (
        lambda s: dev_signed(s.pki, claims("atk-exp", exp=int(time.time()) - _leeway(s) - 60)),
        "TOKEN_EXPIRED",
    ),
    "nbf-future": (
        lambda s: dev_signed(s.pki, claims("atk-nbf", nbf=int(time.time()) + _leeway(s) + 120)),
        "TOKEN_NOT_YET_VALID",
    ),
    "iat-future": (
        lambda s: dev_signed(s.pki, claims("atk-iat", iat=int(time.time()) + _leeway(s) + 120, nbf=None)),
        "TOKEN_NOT_YET_VALID",
    ),
    "wrong-aud": (lambda s: dev_signed(s.pki, claims("atk-aud", aud="other-service")), "TOKEN_BAD_AUDIENCE"),
    "wrong-aud-list": (
        lambda s: dev_signed(s.pki, claims("atk-aud-list", aud=["other", "services"])),
        "TOKEN_BAD_AUDIENCE",
    ),
    "unknown-iss": (
        lambda s: dev_signed(s.pki, claims("atk-iss", iss="https://attacker.example")),
        "TOKEN_BAD_ISSUER",
    ),
    **{
        f"missing-{c}": (_missing(c), "TOKEN_CLAIM_MISSING")
        for c in ("exp", "iat", "iss", "aud", "sub", "tenant")
    },
    "invalid-tenant": (
        lambda s: dev_signed(s.pki, claims("atk-tenant", tenant="ACME")),
        "TOKEN_CLAIM_INVALID",
    ),
    "roles-not-a-list": (
        lambda s: dev_signed(s.pki, claims("atk-roles", roles="admin")),
        "TOKEN_CLAIM_INVALID",
    ),
    # Times and lifetimes (tests/security/test_token_lifetime.py has the rest).
    "exp-a-string": (
        lambda s: dev_signed(s.pki, claims("atk-exp-str", exp="99999999999")),
        "TOKEN_CLAIM_INVALID",
    ),
    "exp-far-future": (
        lambda s: dev_signed(s.pki, claims("atk-exp-far", exp=10**20)),
        "TOKEN_LIFETIME_TOO_LONG",
    ),
    # Malformed, yet with a readable payload (nothing unverified counts against the identity it names).
    "two-segments": (lambda s: signing_input({"alg": "EdDSA"}, claims("atk-two")), "TOKEN_MALFORMED"),
    "header-not-base64-json": (
        lambda s: "%%%." + dev_signed(s.pki, claims("atk-hdr")).split(".", 1)[1],
        "TOKEN_MALFORMED",
    ),
    "header-not-an-object": (
        lambda s: f"{b64(b'[1, 2]')}.{b64(json.dumps(claims('atk-list')).encode())}.{b64(b'sig')}",
        "TOKEN_MALFORMED",
    ),
}


async def test_the_hand_made_tokens_are_valid_when_not_tampered_with(
    echo_stack: LiveStack, door: str
) -> None:
    # The helpers the attacks start from make tokens the gateway accepts, so each refusal below is
    # down to the one thing its attack changed.
    token = dev_signed(echo_stack.pki, claims("tester"))
    assert await echo_stack.generate(door, token, prompt="genuine") == "genuine"
    # Clock skew within the leeway is tolerated.
    skewed = dev_signed(echo_stack.pki, claims("tester", nbf=int(time.time()) + _leeway(echo_stack) // 2))
    assert await outcome(echo_stack, skewed, door=door) == "OK"


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_a_forged_or_broken_token_is_refused_with_its_reason(
    echo_stack: LiveStack, attack: str, door: str
) -> None:
    make, reason = ATTACKS[attack]
    token = make(echo_stack)
    before = (await echo_stack.worker_info("acme", "echo")).requests_started
    err = await refused(echo_stack, token, door=door)
    assert_refusal(err, AuthenticationError, reason, token)
    assert (await echo_stack.worker_info("acme", "echo")).requests_started == before


# --- the tenant comes from the identity, never from the request --------------------------------


async def test_a_tenant_header_does_not_let_a_user_into_another_tenant(
    echo_stack: LiveStack, door: str
) -> None:
    # acme/bob (a user in acme by the repository policy) is a valid caller at home...
    token = mint_dev_token(echo_stack.pki, echo_stack.config.auth, tenant="acme", subject="bob")
    assert await outcome(echo_stack, token, door=door) == "OK"
    # ...and naming globex in the header gets him no further than the policy allows: nowhere.
    before = (await echo_stack.worker_info("globex", "echo")).requests_started
    err = await refused(echo_stack, token, tenant="globex", door=door)
    assert_refusal(err, PermissionDeniedError, "POLICY_DENIED", token)
    assert (await echo_stack.worker_info("globex", "echo")).requests_started == before


async def test_naming_another_tenants_model_does_not_reach_its_worker(
    echo_stack: LiveStack, door: str
) -> None:
    # "slow" is acme's model; globex only has "echo". The route follows globex's identity.
    assert await outcome(echo_stack, echo_stack.token("acme"), model="slow", door=door) == "OK"
    before = (await echo_stack.worker_info("acme", "slow")).requests_started
    token = echo_stack.token("globex")
    err = await refused(echo_stack, token, model="slow", door=door)
    assert_refusal(err, InvalidRequestError, "UNKNOWN_MODEL", token)
    assert isinstance(err, InvalidRequestError) and err.field == "model"
    assert (await echo_stack.worker_info("acme", "slow")).requests_started == before


@pytest.mark.parametrize("header", ["ACME", "acme/../globex", "-acme", "globex acme", "a" * 64])
async def test_a_malformed_tenant_header_is_refused(echo_stack: LiveStack, header: str, door: str) -> None:
    token = echo_stack.token("acme")
    err = await refused(echo_stack, token, tenant=header, door=door)
    assert_refusal(err, PermissionDeniedError, "TENANT_INVALID", token)


async def test_an_explicit_grant_lets_a_user_act_in_another_tenant(
    make_stack: Callable[[str], LiveStack], tmp_path: Path
) -> None:
    policy = make_policy_dir(tmp_path / "p", TEST_GRANTS + "g, acme/tester, user, globex\n")
    stack = make_stack(f'policy_dir = "{policy}"\n' + textwrap.dedent(ECHO_TOML) + NO_LOCKOUT)
    token = stack.token("acme")
    before = {t: (await stack.worker_info(t, "echo")).requests_started for t in ("acme", "globex")}
    async with client(stack, token, tenant="globex") as c:
        answer = await c.generate("served in globex", model="echo")
        assert await c.list_models() == ["echo"]  # globex's models, not acme's
        # Acting in globex means globex's routes: acme's "slow" is out of reach there too.
        with pytest.raises(InvalidRequestError) as err:
            await c.generate("hi", model="slow")
    assert answer.text == "served in globex"
    assert_refusal(err.value, InvalidRequestError, "UNKNOWN_MODEL", token)
    after = {t: (await stack.worker_info(t, "echo")).requests_started for t in ("acme", "globex")}
    assert after == {"acme": before["acme"], "globex": before["globex"] + 1}

    # The grant names acme/tester only: other acme users, valid at home, stay out of globex.
    bob = mint_dev_token(stack.pki, stack.config.auth, tenant="acme", subject="bob")
    assert await outcome(stack, bob) == "OK"
    assert_refusal(await refused(stack, bob, tenant="globex"), PermissionDeniedError, "POLICY_DENIED", bob)
    # A grant is one-way: globex's tester gets nothing in acme from it.
    globex = stack.token("globex")
    denied = await refused(stack, globex, tenant="acme")
    assert_refusal(denied, PermissionDeniedError, "POLICY_DENIED", globex)
    assert_no_leak([gateway_log(stack), audit_file(stack)], [token, bob, globex])


# --- a second issuer that may speak for globex only, with a JWKS that rotates -----------------


@dataclass
class Partner:
    stack: LiveStack
    jwks: Path
    key: ed25519.Ed25519PrivateKey  # kid "partner-1", in the JWKS at start

    def token(
        self, tenant: str, sub: str = "tester", *, key: Any = None, kid: str = "partner-1", **kw: Any
    ) -> str:
        payload = claims(sub, **{"iss": PARTNER, "tenant": tenant, **kw})
        return signed(key or self.key, {"alg": "EdDSA", "typ": "JWT", "kid": kid}, payload)


def write_jwks(path: Path, text: str) -> None:
    """Replace the file in one step, as a deployment tool would."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def jwks_text(**keys: ed25519.Ed25519PrivateKey) -> str:
    return json.dumps({"keys": [public_jwk(key, kid) for kid, key in keys.items()]})


@pytest.fixture(scope="module")
def partner(state_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Partner]:
    """A private stack (lockout off, a small token limit) trusting the dev issuer for both tenants
    and `partner-idp` for globex only, the partner's keys in a JWKS file the tests may rewrite."""
    run = tmp_path_factory.mktemp("partner")
    key = ed25519.Ed25519PrivateKey.generate()
    (run / "partner").mkdir()
    jwks = run / "partner" / "jwks.json"
    jwks.write_text(jwks_text(**{"partner-1": key}))
    policy = make_policy_dir(run / "policy")
    (policy / "tenants.toml").write_text(
        f'[tenants.acme]\nissuers = ["{DEV}"]\n\n[tenants.globex]\nissuers = ["{DEV}", "{PARTNER}"]\n'
    )
    toml = (
        f'policy_dir = "{policy}"\n'
        + textwrap.dedent(ECHO_TOML)
        + NO_LOCKOUT
        + f"\n[auth]\nmax_token_bytes = {SMALL_TOKEN_LIMIT}\n"
        + f'\n[[auth.issuers]]\nissuer = "{DEV}"\n'
        + f'\n[[auth.issuers]]\nissuer = "{PARTNER}"\njwks_file = "{jwks}"\n'
    )
    (run / "airlock.toml").write_text(toml)
    stack = Stack(
        config_mod.load(run / "airlock.toml", state_dir=state_dir), run_dir=run, listen="127.0.0.1:0"
    )
    stack.start(timeout=600)
    try:
        yield Partner(LiveStack(stack), jwks, key)
    finally:
        stack.stop(timeout=5)


async def test_an_issuer_speaks_only_for_the_tenants_the_policy_names(partner: Partner, door: str) -> None:
    stack = partner.stack
    token = partner.token("globex")
    async with client(stack, token) as c:
        assert (await c.generate("from the partner", model="echo")).text == "from the partner"
    foreign = partner.token("acme")
    assert_refusal(
        await refused(stack, foreign, door=door), AuthenticationError, "TOKEN_ISSUER_NOT_ALLOWED", foreign
    )
    # The dev issuer still speaks for both tenants on this stack.
    assert await outcome(stack, stack.token("acme"), door=door) == "OK"
    assert await outcome(stack, stack.token("globex"), door=door) == "OK"


async def test_an_issuers_key_cannot_sign_for_another_issuer(partner: Partner, door: str) -> None:
    stack = partner.stack
    # kids are looked up among the claimed issuer's keys only: the partner's kid is unknown to the dev
    # issuer, and the dev kid with the partner's signature does not verify.
    as_dev = partner.token("acme", iss=DEV)
    assert_refusal(await refused(stack, as_dev, door=door), AuthenticationError, "TOKEN_UNKNOWN_KEY", as_dev)
    dev_kid = partner.token("acme", iss=DEV, kid=stack.pki.jwt_kid)
    assert_refusal(
        await refused(stack, dev_kid, door=door), AuthenticationError, "TOKEN_BAD_SIGNATURE", dev_kid
    )
    # And the other way round: the dev key cannot sign as the partner, under either kid.
    as_partner = partner.token("globex", key=dev_key(stack.pki), kid=stack.pki.jwt_kid)
    assert_refusal(
        await refused(stack, as_partner, door=door), AuthenticationError, "TOKEN_UNKNOWN_KEY", as_partner
    )
    partner_kid = partner.token("globex", key=dev_key(stack.pki))
    assert_refusal(
        await refused(stack, partner_kid, door=door), AuthenticationError, "TOKEN_BAD_SIGNATURE", partner_kid
    )


async def test_garbage_and_other_schemes_are_malformed(partner: Partner, door: str) -> None:
    stack = partner.stack
    for garbage in ("garbage", NOT_A_JWT, "a.b.c", "...."):
        assert_refusal(
            await refused(stack, garbage, door=door), AuthenticationError, "TOKEN_MALFORMED", garbage
        )
    valid = partner.token("globex")
    schemes = [
        (f"Basic {BASIC_SECRET}", BASIC_SECRET),
        (f"Token {valid}", valid),  # a valid token under another scheme is still refused
        (f"Bearer{valid}", valid),
        ("Bearer ", ""),
    ]
    for value, secret in schemes:
        err = await raw_call(stack, (("authorization", value),), door=door)
        assert_refusal(err, AuthenticationError, "TOKEN_MALFORMED", secret)
    assert_refusal(await raw_call(stack, (), door=door), AuthenticationError, "TOKEN_MISSING")


def padded(pki: DevPki, sub: str, size: int) -> str:
    """A genuine dev token of about `size` bytes."""
    bare = len(dev_signed(pki, claims(sub, pad="")))
    return dev_signed(pki, claims(sub, pad="p" * max(0, (size - bare) * 3 // 4)))


async def test_an_oversized_token_is_refused_before_it_is_parsed(partner: Partner, door: str) -> None:
    stack = partner.stack
    assert stack.config.auth.max_token_bytes == SMALL_TOKEN_LIMIT
    fits = padded(stack.pki, "tester", SMALL_TOKEN_LIMIT - 200)
    assert len(fits) <= SMALL_TOKEN_LIMIT and await outcome(stack, fits, door=door) == "OK"
    big = padded(stack.pki, "tester", SMALL_TOKEN_LIMIT + 200)
    assert len(big) > SMALL_TOKEN_LIMIT
    assert_refusal(await refused(stack, big, door=door), AuthenticationError, "TOKEN_TOO_LARGE", big)


async def test_a_token_just_over_the_default_limit_is_refused_as_too_large(
    echo_stack: LiveStack, door: str
) -> None:
    limit = echo_stack.config.auth.max_token_bytes
    for i, extra in enumerate([512, 2048, 4096, 6144] * 3):
        token = padded(echo_stack.pki, f"atk-big-{i}", limit + extra)
        err = await refused(echo_stack, token, door=door)
        assert token not in str(err)  # what gRPC says lists header sizes only
        assert_refusal(err, AuthenticationError, "TOKEN_TOO_LARGE", token)


async def test_jwks_rotation_takes_effect_without_a_restart(partner: Partner) -> None:
    stack = partner.stack
    gateway = stack.stack.gateway
    assert gateway is not None
    pid = gateway.process.pid
    new_key = ed25519.Ed25519PrivateKey.generate()
    old = partner.token("globex")
    new = partner.token("globex", key=new_key, kid="partner-2")
    assert await outcome(stack, old) == "OK"
    assert await outcome(stack, new) == "TOKEN_UNKNOWN_KEY"

    # Publish the new key next to the old one: both verify.
    write_jwks(partner.jwks, jwks_text(**{"partner-1": partner.key, "partner-2": new_key}))
    assert await eventually(stack, new, "OK") == "OK"
    assert await outcome(stack, old) == "OK"

    # Retire the old key: its tokens stop verifying, the new key's keep working.
    write_jwks(partner.jwks, jwks_text(**{"partner-2": new_key}))
    assert await eventually(stack, old, "TOKEN_UNKNOWN_KEY") == "TOKEN_UNKNOWN_KEY"
    assert await outcome(stack, new) == "OK"

    # A broken file is refused and the keys in service stay: no outage, no key resurrected.
    log = gateway_log(stack)
    rejected_before = log.read_text(errors="replace").count("JWKS reload rejected")
    write_jwks(partner.jwks, "{ this is not json")
    deadline = time.monotonic() + RELOAD_WAIT_S
    while log.read_text(errors="replace").count("JWKS reload rejected") == rejected_before:
        assert time.monotonic() < deadline, "the gateway never noticed the broken JWKS"
        await asyncio.sleep(0.2)
    await asyncio.sleep(2)
    assert await outcome(stack, new) == "OK"
    assert await outcome(stack, old) == "TOKEN_UNKNOWN_KEY"
    assert gateway.process.poll() is None and gateway.process.pid == pid  # reloaded, not restarted

    # Leave the file as the fixture made it (plus the new key) for any test that runs later.
    write_jwks(partner.jwks, jwks_text(**{"partner-1": partner.key, "partner-2": new_key}))
    assert await eventually(stack, old, "OK") == "OK"


# --- canary: credentials never reach a log or the audit trail ----------------------------------


async def test_no_token_reaches_a_log_or_the_audit_trail(
    echo_stack: LiveStack, partner: Partner, door: str
) -> None:
    # Its own traffic first, so the check means something when this test runs alone: a valid call,
    # a refused one with a readable payload, a cross-tenant denial and an issuer refusal.
    valid = echo_stack.token("acme")
    forged = attacker_signed(claims("canary"), kid=echo_stack.pki.jwt_kid)
    bob = mint_dev_token(echo_stack.pki, echo_stack.config.auth, tenant="acme", subject="bob")
    partner_foreign = partner.token("acme", "canary")
    assert await outcome(echo_stack, valid, door=door) == "OK"
    assert await outcome(echo_stack, forged, door=door) == "TOKEN_BAD_SIGNATURE"
    assert await outcome(echo_stack, bob, tenant="globex", door=door) == "POLICY_DENIED"
    assert await outcome(partner.stack, partner_foreign, door=door) == "TOKEN_ISSUER_NOT_ALLOWED"
    assert await outcome(partner.stack, NOT_A_JWT, door=door) == "TOKEN_MALFORMED"

    audit = audit_file(echo_stack)
    assert audit == audit_file(partner.stack)  # one state directory: one audit trail for both
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    reasons = {r.get("reason") for r in records}
    assert {"TOKEN_BAD_SIGNATURE", "TOKEN_ISSUER_NOT_ALLOWED", "TOKEN_MALFORMED"} <= reasons
    assert any(r.get("decision") == "deny" and r.get("subject") == "acme/bob" for r in records)
    # The shape check refuses any JWT, so it covers every token the session's tests sent, not only these.
    assert_no_leak(
        [gateway_log(echo_stack), gateway_log(partner.stack), audit],
        [valid, forged, bob, partner_foreign, NOT_A_JWT, BASIC_SECRET],
    )
