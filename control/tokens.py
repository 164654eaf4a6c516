"""Mint development tokens with the dev signing key (what `airlock token` prints).

Production tokens come from the site's identity provider; these exist so a laptop or CI stack can
be called with real, verifiable JWTs.
"""

from __future__ import annotations

import time
import uuid

import jwt
from cryptography.hazmat.primitives import serialization

from control.pki import DevPki
from gateway.config import AuthConfig

__all__ = ["mint_dev_token"]


def mint_dev_token(
    pki: DevPki,
    auth: AuthConfig,
    *,
    tenant: str,
    subject: str,
    ttl_seconds: int = 3600,
    roles: tuple[str, ...] = ("user",),
) -> str:
    """A dev token for `subject` in `tenant`, valid `ttl_seconds` from now.

    A negative ttl mints an already expired token (tests of expiry); one longer than
    `auth.max_token_lifetime_seconds` is refused, as the gateway would refuse the token."""
    if ttl_seconds > auth.max_token_lifetime_seconds:
        limit = auth.max_token_lifetime_seconds
        raise ValueError(f"ttl_seconds {ttl_seconds} exceeds auth.max_token_lifetime_seconds ({limit})")
    issuer = auth.dev_issuer
    if issuer is None:
        raise ValueError("no configured issuer uses the dev JWKS; dev tokens would not verify")
    key = serialization.load_pem_private_key(pki.jwt_key.read_bytes(), password=None)
    now = int(time.time())
    claims = {
        "iss": issuer.issuer,
        "aud": auth.audience,
        "sub": subject,
        "tenant": tenant,
        "roles": list(roles),
        "iat": now,
        "nbf": now,
        "exp": now + ttl_seconds,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": pki.jwt_kid})  # type: ignore[arg-type]
