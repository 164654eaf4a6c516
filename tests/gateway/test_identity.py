"""`JwtVerifier` against a local JWKS: each refusal has its own stable reason and never echoes the token."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import ECAlgorithm

from airlock.errors import AuthenticationError
from control.pki import DevPki, ensure_dev_pki
from control.tokens import mint_dev_token
from gateway.auth.identity import JwtVerifier, Principal, bearer_token
from gateway.config import AuthConfig

AUTH = AuthConfig()
ISSUER = AUTH.issuers[0].issuer


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return ensure_dev_pki(tmp_path_factory.mktemp("identity"))


@pytest.fixture(scope="module")
def verifier(pki: DevPki) -> JwtVerifier:
    return make_verifier(pki.jwks)


def make_verifier(jwks: Path, may_speak_for: Any = lambda issuer, tenant: True) -> JwtVerifier:
    return JwtVerifier(AUTH, {ISSUER: jwks}, may_speak_for)


def signing_key(pki: DevPki) -> ed25519.Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pki.jwt_key.read_bytes(), password=None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    return key


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUTH.audience,
        "sub": "alice",
        "tenant": "acme",
        "roles": ["user"],
        "iat": now,
        "exp": now + 600,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(pki: DevPki, payload: dict[str, Any], *, key: Any = None, **headers: Any) -> str:
    headers.setdefault("kid", pki.jwt_kid)
    headers = {k: v for k, v in headers.items() if v is not None}
    return jwt.encode(payload, key or signing_key(pki), algorithm="EdDSA", headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"


def signed(pki: DevPki, header: dict[str, Any], payload: dict[str, Any]) -> str:
    """Sign with the dev key over exactly this header (jwt.encode rewrites some header fields)."""
    signing_input = unsigned(header, payload)
    return f"{signing_input}.{b64(signing_key(pki).sign(signing_input.encode()))}"


def refused(verifier: JwtVerifier, token: str, reason: str) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as info:
        verifier.verify(token)
    err = info.value
    assert err.reason == reason
    assert token not in str(err) and token not in err.message
    for part in token.split("."):
        if len(part) > 8:
            assert part not in str(err)
    return err


def test_a_dev_token_yields_its_principal(pki: DevPki, verifier: JwtVerifier) -> None:
    token = mint_dev_token(pki, AUTH, tenant="acme", subject="alice", roles=("user", "admin"))
    assert verifier.verify(token) == Principal(
        subject="alice", tenant="acme", roles=("user", "admin"), method="jwt"
    )


def test_roles_default_to_empty(pki: DevPki, verifier: JwtVerifier) -> None:
    assert verifier.verify(sign(pki, claims(roles=None))).roles == ()


def test_a_hand_signed_token_verifies(pki: DevPki, verifier: JwtVerifier) -> None:
    # The helper the header tests rely on makes tokens that are otherwise valid.
    token = signed(pki, {"alg": "EdDSA", "typ": "JWT", "kid": pki.jwt_kid}, claims())
    assert verifier.verify(token).subject == "alice"


def test_expiry_within_the_leeway_is_accepted(pki: DevPki, verifier: JwtVerifier) -> None:
    token = sign(pki, claims(exp=int(time.time()) - AUTH.leeway_seconds // 2))
    assert verifier.verify(token).tenant == "acme"


def test_an_expired_token_is_refused(pki: DevPki, verifier: JwtVerifier) -> None:
    token = mint_dev_token(pki, AUTH, tenant="acme", subject="alice", ttl_seconds=-300)
    refused(verifier, token, "TOKEN_EXPIRED")


def test_a_token_not_valid_yet_is_refused(pki: DevPki, verifier: JwtVerifier) -> None:
    refused(verifier, sign(pki, claims(nbf=int(time.time()) + 600)), "TOKEN_NOT_YET_VALID")


@pytest.mark.parametrize("aud", ["other-service", ["other", "services"]])
def test_a_wrong_audience_is_refused(pki: DevPki, verifier: JwtVerifier, aud: Any) -> None:
    refused(verifier, sign(pki, claims(aud=aud)), "TOKEN_BAD_AUDIENCE")


def test_a_wrong_issuer_is_refused(pki: DevPki, verifier: JwtVerifier) -> None:
    refused(verifier, sign(pki, claims(iss="https://evil.example")), "TOKEN_BAD_ISSUER")


@pytest.mark.parametrize("claim", ["exp", "iat", "sub", "tenant", "iss", "aud"])
def test_a_missing_required_claim_is_refused(pki: DevPki, verifier: JwtVerifier, claim: str) -> None:
    err = refused(verifier, sign(pki, claims(**{claim: None})), "TOKEN_CLAIM_MISSING")
    assert claim in err.message


@pytest.mark.parametrize("tenant", ["Acme", "-acme", "acme/../globex", "a" * 64, "acme\n", 7, ["acme"]])
def test_an_invalid_tenant_is_refused(pki: DevPki, verifier: JwtVerifier, tenant: Any) -> None:
    refused(verifier, sign(pki, claims(tenant=tenant)), "TOKEN_CLAIM_INVALID")


def test_an_empty_tenant_is_missing(pki: DevPki, verifier: JwtVerifier) -> None:
    refused(verifier, sign(pki, claims(tenant="")), "TOKEN_CLAIM_MISSING")


def test_an_empty_subject_is_refused(pki: DevPki, verifier: JwtVerifier) -> None:
    refused(verifier, sign(pki, claims(sub="")), "TOKEN_CLAIM_MISSING")


@pytest.mark.parametrize("roles", ["admin", [1], {"admin": True}])
def test_roles_must_be_a_list_of_strings(pki: DevPki, verifier: JwtVerifier, roles: Any) -> None:
    refused(verifier, sign(pki, claims(roles=roles)), "TOKEN_CLAIM_INVALID")


# --- claims are bounded before they can reach a log, an audit record or a metric ----------------


@pytest.mark.parametrize(
    "sub",
    [
        "a" * 257,
        "alice\nFAKE audit line",
        "alice\r",
        "al\x1bice",
        "alice\u2028x",
        "\u200balice",
        "tab\there",
        7,
        ["alice"],
    ],
)
def test_a_subject_over_the_limit_or_with_control_characters_is_refused(
    pki: DevPki, verifier: JwtVerifier, sub: Any
) -> None:
    err = refused(verifier, sign(pki, claims(sub=sub)), "TOKEN_CLAIM_INVALID")
    assert "sub" in err.message


def test_a_subject_at_the_limit_with_any_printable_text_verifies(pki: DevPki, verifier: JwtVerifier) -> None:
    for sub in ("a" * 256, "alice@example.com", "auth0|5f1c", "Zoë Ω", "first last"):
        assert verifier.verify(sign(pki, claims(sub=sub))).subject == sub


@pytest.mark.parametrize("roles", [["r"] * 65, ["x" * 129], [""], ["ad\nmin"]])
def test_roles_over_the_limits_are_refused(pki: DevPki, verifier: JwtVerifier, roles: Any) -> None:
    refused(verifier, sign(pki, claims(roles=roles)), "TOKEN_CLAIM_INVALID")


def test_roles_at_the_limits_verify(pki: DevPki) -> None:
    roomy = JwtVerifier(
        dataclasses.replace(AUTH, max_token_bytes=1 << 16), {ISSUER: pki.jwks}, lambda i, t: True
    )
    roles = [f"{i:03d}" + "r" * 125 for i in range(64)]
    assert roomy.verify(sign(pki, claims(roles=roles))).roles == tuple(roles)


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_an_unsigned_token_is_refused(pki: DevPki, verifier: JwtVerifier, alg: str) -> None:
    token = unsigned({"alg": alg, "typ": "JWT", "kid": pki.jwt_kid}, claims()) + "."
    refused(verifier, token, "TOKEN_ALGORITHM_NOT_ALLOWED")


def test_hs256_signed_with_the_public_key_is_refused(pki: DevPki, verifier: JwtVerifier) -> None:
    # Key confusion: the public key is no secret, so an HMAC over it proves nothing.
    public = signing_key(pki).public_key()
    for secret in (
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
        pki.jwks.read_bytes(),
    ):
        signing_input = unsigned({"alg": "HS256", "typ": "JWT", "kid": pki.jwt_kid}, claims())
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        refused(verifier, f"{signing_input}.{b64(mac)}", "TOKEN_ALGORITHM_NOT_ALLOWED")


def test_an_algorithm_missing_from_the_header_is_refused(pki: DevPki, verifier: JwtVerifier) -> None:
    token = unsigned({"typ": "JWT", "kid": pki.jwt_kid}, claims()) + "." + b64(b"x" * 64)
    refused(verifier, token, "TOKEN_ALGORITHM_NOT_ALLOWED")


@pytest.mark.parametrize(
    "header",
    [
        {"jku": "https://evil.example/jwks.json"},
        {"x5u": "https://evil.example/cert.pem"},
        {"x5c": ["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"]},
        {"jwk": {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}},
        {"b64": True, "crit": ["b64"]},  # the one crit value PyJWT itself lets through
    ],
    ids=["jku", "x5u", "x5c", "jwk", "crit"],
)
def test_headers_that_point_at_other_keys_are_refused(
    pki: DevPki, verifier: JwtVerifier, header: dict[str, Any]
) -> None:
    token = signed(pki, {"alg": "EdDSA", "typ": "JWT", "kid": pki.jwt_kid, **header}, claims())
    refused(verifier, token, "TOKEN_HEADER_NOT_ALLOWED")


@pytest.mark.parametrize("crit", [["exp"], ["urn:example:must-understand"], [], "b64"])
def test_any_crit_header_is_refused(pki: DevPki, verifier: JwtVerifier, crit: Any) -> None:
    token = signed(pki, {"alg": "EdDSA", "typ": "JWT", "kid": pki.jwt_kid, "crit": crit}, claims())
    with pytest.raises(AuthenticationError) as info:
        verifier.verify(token)
    assert token not in str(info.value)


@pytest.mark.parametrize("crit", [["exp"], ["urn:example:must-understand"]])
def test_any_crit_header_is_refused_as_not_allowed(
    pki: DevPki, verifier: JwtVerifier, crit: list[str]
) -> None:
    token = signed(pki, {"alg": "EdDSA", "typ": "JWT", "kid": pki.jwt_kid, "crit": crit}, claims())
    refused(verifier, token, "TOKEN_HEADER_NOT_ALLOWED")


@pytest.mark.parametrize("kid", ["no-such-key", "", None])
def test_an_unknown_or_missing_kid_is_refused(pki: DevPki, verifier: JwtVerifier, kid: str | None) -> None:
    token = (
        sign(pki, claims(), kid=kid) if kid is not None else jwt.encode(claims(), signing_key(pki), "EdDSA")
    )
    assert kid is not None or "kid" not in jwt.get_unverified_header(token)
    refused(verifier, token, "TOKEN_UNKNOWN_KEY")


@pytest.mark.parametrize("kid", [5, ["dev"], None])
def test_a_kid_that_is_not_a_string_names_no_key(pki: DevPki, verifier: JwtVerifier, kid: Any) -> None:
    token = unsigned({"alg": "EdDSA", "typ": "JWT", "kid": kid}, claims()) + "." + b64(b"x" * 64)
    refused(verifier, token, "TOKEN_UNKNOWN_KEY")


def test_another_key_with_the_same_kid_is_refused(pki: DevPki, verifier: JwtVerifier) -> None:
    impostor = ed25519.Ed25519PrivateKey.generate()
    refused(verifier, sign(pki, claims(), key=impostor), "TOKEN_BAD_SIGNATURE")


def test_a_tampered_payload_is_refused(pki: DevPki, verifier: JwtVerifier) -> None:
    header, _, signature = sign(pki, claims()).split(".")
    forged = b64(json.dumps(claims(tenant="globex")).encode())
    refused(verifier, f"{header}.{forged}.{signature}", "TOKEN_BAD_SIGNATURE")


def test_an_oversized_token_is_refused(pki: DevPki, verifier: JwtVerifier) -> None:
    token = sign(pki, claims(padding="p" * AUTH.max_token_bytes))
    refused(verifier, token, "TOKEN_TOO_LARGE")


@pytest.mark.parametrize("token", ["garbage", "", "a.b.c", "....", "eyJhbGciOiJFZERTQSJ9", "%%%.%%%.%%%"])
def test_garbage_is_refused_as_malformed(verifier: JwtVerifier, token: str) -> None:
    with pytest.raises(AuthenticationError) as info:
        verifier.verify(token)
    assert info.value.reason == "TOKEN_MALFORMED"


def test_a_header_that_is_not_an_object_is_malformed(verifier: JwtVerifier) -> None:
    token = f"{b64(b'[1, 2]')}.{b64(b'{}')}.{b64(b'sig')}"
    refused(verifier, token, "TOKEN_MALFORMED")


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def mixed_verifier(
    pki: DevPki, ec_key: ec.EllipticCurvePrivateKey, tmp_path_factory: pytest.TempPathFactory
) -> JwtVerifier:
    """A JWKS holding the dev Ed25519 key and an ES256 key with kid "ec-1"."""
    ec_jwk = ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True)
    ec_jwk.update(kid="ec-1", alg="ES256", use="sig")
    keys = json.loads(pki.jwks.read_text())["keys"]
    path = tmp_path_factory.mktemp("mixed") / "jwks.json"
    path.write_text(json.dumps({"keys": [*keys, ec_jwk]}))
    return make_verifier(path)


def test_an_es256_token_verifies_against_its_es256_key(
    mixed_verifier: JwtVerifier, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    token = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "ec-1"})
    assert mixed_verifier.verify(token).subject == "alice"


def test_a_header_algorithm_that_differs_from_its_key_is_refused(
    pki: DevPki, mixed_verifier: JwtVerifier
) -> None:
    # The header says EdDSA (allowed) and names the ES256 key: the key decides, not the header.
    refused(mixed_verifier, sign(pki, claims(), kid="ec-1"), "TOKEN_KEY_MISMATCH")


def test_an_ed25519_token_still_verifies_in_a_mixed_jwks(pki: DevPki, mixed_verifier: JwtVerifier) -> None:
    assert mixed_verifier.verify(sign(pki, claims())).tenant == "acme"


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "{}",
        '{"keys": []}',
        '{"keys": [{"kty": "OKP"}]}',
        '{"keys": [{"kty": "OKP", "crv": "Ed25519"}]}',
    ],
)
def test_an_unusable_jwks_is_refused_at_start(tmp_path: Path, content: str) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=str(path)):
        make_verifier(path)


def test_a_jwks_key_without_kid_is_refused_at_start(pki: DevPki, tmp_path: Path) -> None:
    keys = json.loads(pki.jwks.read_text())["keys"]
    del keys[0]["kid"]
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": keys}))
    with pytest.raises(ValueError, match="kid"):
        make_verifier(path)


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ((("authorization", "Bearer abc.def.ghi"),), "abc.def.ghi"),
        ((("x-other", "1"), ("authorization", "bearer   tok  ")), "tok"),
        ([("authorization", "BEARER t")], "t"),
    ],
)
def test_bearer_token_is_read_from_metadata(metadata: Any, token: str) -> None:
    assert bearer_token(metadata) == token


@pytest.mark.parametrize(
    "metadata", [None, (), (("x-api-key", "secret"),), (("Authorization-x", "Bearer a"),)]
)
def test_a_missing_bearer_token_is_none(metadata: Any) -> None:
    assert bearer_token(metadata) is None


@pytest.mark.parametrize(
    "value", ["Basic c2VjcmV0LXZhbHVl", "Bearer", "Bearer    ", "Token s3cret-value", "s3cret"]
)
def test_a_non_bearer_authorization_is_malformed(value: str) -> None:
    with pytest.raises(AuthenticationError) as info:
        bearer_token((("authorization", value),))
    assert info.value.reason == "TOKEN_MALFORMED"
    for secret in ("c2VjcmV0LXZhbHVl", "s3cret"):
        assert secret not in str(info.value)


# --- the verified-token cache -------------------------------------------------------------------


def test_a_reused_token_is_verified_once(pki: DevPki, monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = make_verifier(pki.jwks)
    calls = []
    real = jwt.decode

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counted)
    token = sign(pki, claims())
    assert [verifier.verify(token).subject for _ in range(5)] == ["alice"] * 5
    assert len(calls) == 1


def test_a_cached_token_is_refused_once_it_expires(pki: DevPki) -> None:
    verifier = JwtVerifier(dataclasses.replace(AUTH, leeway_seconds=0), {ISSUER: pki.jwks}, lambda i, t: True)
    token = sign(pki, claims(exp=int(time.time()) + 1))
    assert verifier.verify(token).subject == "alice"
    time.sleep(2.1)
    refused(verifier, token, "TOKEN_EXPIRED")


def test_the_policy_check_runs_on_every_call_even_for_a_cached_token(pki: DevPki) -> None:
    allowed = {"acme"}
    verifier = make_verifier(pki.jwks, lambda issuer, tenant: tenant in allowed)
    token = sign(pki, claims())
    assert verifier.verify(token).tenant == "acme"
    allowed.clear()  # the security team withdraws the issuer's right to speak for acme
    refused(verifier, token, "TOKEN_ISSUER_NOT_ALLOWED")


def test_a_jwks_reload_forgets_every_verified_token(pki: DevPki, tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(pki.jwks.read_text())
    verifier = make_verifier(path)
    token = sign(pki, claims())
    assert verifier.verify(token).subject == "alice"
    other = ed25519.Ed25519PrivateKey.generate()  # the dev key is withdrawn, another takes its kid
    jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(other.public_key()))
    path.write_text(json.dumps({"keys": [{**jwk, "kid": pki.jwt_kid}]}))
    assert verifier.reload(path) is True
    refused(verifier, token, "TOKEN_BAD_SIGNATURE")


def test_the_cache_is_bounded(pki: DevPki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.auth.identity.CACHE_SIZE", 3)
    verifier = make_verifier(pki.jwks)
    for n in range(10):
        verifier.verify(sign(pki, claims(sub=f"user-{n}")))
    assert len(verifier._verified) == 3


def test_an_exp_too_large_for_a_time_is_refused_not_a_crash(pki: DevPki, verifier: JwtVerifier) -> None:
    refused(verifier, sign(pki, claims(exp=10**400)), "TOKEN_CLAIM_INVALID")
