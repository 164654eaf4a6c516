"""Who is calling: bearer JWTs verified against a local JWKS file, turned into a `Principal`.

Keys come only from the local JWKS (never `jku`/`x5u`/embedded keys), chosen by `kid`; only
asymmetric algorithms on the allow-list are accepted; `exp`, `iss`, `aud`, `sub` and `tenant` are
required. The interceptor rejects a call before any servicer code runs; servicers read the
principal from `current_principal()`. Error messages carry a stable reason, never the token.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt

from airlock.errors import AuthenticationError
from airlock.serving import GuardInterceptor
from gateway.config import AuthConfig

__all__ = ["AuthInterceptor", "JwtVerifier", "Principal", "current_principal"]

_TENANT = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_FORBIDDEN_HEADERS = ("jku", "x5u", "x5c", "jwk")


@dataclass(frozen=True)
class Principal:
    subject: str
    tenant: str
    roles: tuple[str, ...]
    method: str  # how the identity was proven: "jwt"


_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("airlock_principal")


def current_principal() -> Principal:
    """The verified caller of the current RPC (set by AuthInterceptor before the servicer runs)."""
    return _principal.get()


class JwtVerifier:
    def __init__(self, config: AuthConfig, jwks_file: Path) -> None:
        self.config = config
        self._keys = _load_jwks(jwks_file)

    def verify(self, token: str) -> Principal:
        if len(token.encode()) > self.config.max_token_bytes:
            raise AuthenticationError("token too large", reason="TOKEN_TOO_LARGE")
        header = _header(token)
        alg = header.get("alg")
        if alg not in self.config.algorithms:
            raise AuthenticationError("token algorithm not allowed", reason="TOKEN_ALGORITHM_NOT_ALLOWED")
        if any(h in header for h in _FORBIDDEN_HEADERS) or "crit" in header:
            raise AuthenticationError("token header not allowed", reason="TOKEN_HEADER_NOT_ALLOWED")
        kid = header.get("kid")
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise AuthenticationError("token signed by an unknown key", reason="TOKEN_UNKNOWN_KEY")
        if key.algorithm_name != alg:
            raise AuthenticationError("token algorithm does not match its key", reason="TOKEN_KEY_MISMATCH")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self.config.audience,
                issuer=self.config.issuer,
                leeway=self.config.leeway_seconds,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("token expired", reason="TOKEN_EXPIRED") from None
        except jwt.InvalidAudienceError:
            raise AuthenticationError("token audience not accepted", reason="TOKEN_BAD_AUDIENCE") from None
        except jwt.InvalidIssuerError:
            raise AuthenticationError("token issuer not trusted", reason="TOKEN_BAD_ISSUER") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthenticationError(
                f"token lacks the {exc.claim!r} claim", reason="TOKEN_CLAIM_MISSING"
            ) from None
        except jwt.ImmatureSignatureError:
            raise AuthenticationError("token not valid yet", reason="TOKEN_NOT_YET_VALID") from None
        except jwt.InvalidSignatureError:
            raise AuthenticationError("token signature invalid", reason="TOKEN_BAD_SIGNATURE") from None
        except jwt.PyJWTError:
            raise AuthenticationError("token invalid", reason="TOKEN_INVALID") from None
        tenant, subject = claims.get("tenant"), claims.get("sub")
        if not isinstance(tenant, str) or not _TENANT.fullmatch(tenant):
            raise AuthenticationError("token lacks a valid 'tenant' claim", reason="TOKEN_CLAIM_MISSING")
        if not isinstance(subject, str) or not subject:
            raise AuthenticationError("token lacks a valid 'sub' claim", reason="TOKEN_CLAIM_MISSING")
        roles = claims.get("roles", [])
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise AuthenticationError("token 'roles' claim must be a list", reason="TOKEN_INVALID")
        return Principal(subject=subject, tenant=tenant, roles=tuple(roles), method="jwt")


def _header(token: str) -> dict[str, Any]:
    """The JOSE header, parsed by us so header policy runs before any library interprets it."""
    try:
        first, _, _ = token.split(".")
        header = json.loads(base64.urlsafe_b64decode(first + "=" * (-len(first) % 4)))
    except (ValueError, binascii.Error):  # json and unicode errors are ValueErrors too
        raise AuthenticationError("malformed token", reason="TOKEN_MALFORMED") from None
    if not isinstance(header, dict):
        raise AuthenticationError("malformed token", reason="TOKEN_MALFORMED")
    return header


def _load_jwks(path: Path) -> dict[str, jwt.PyJWK]:
    try:
        data = json.loads(path.read_text())
        keys = {}
        for entry in data["keys"]:
            jwk = jwt.PyJWK(entry)
            if not entry.get("kid"):
                raise ValueError("a key has no 'kid'")
            keys[entry["kid"]] = jwk
    except (OSError, ValueError, KeyError, TypeError, jwt.PyJWTError) as exc:
        raise ValueError(f"{path}: cannot load JWKS ({type(exc).__name__}: {exc})") from None
    if not keys:
        raise ValueError(f"{path}: JWKS has no keys")
    return keys


def bearer_token(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise AuthenticationError("authorization must be 'Bearer <token>'", reason="TOKEN_MALFORMED")
            return token.strip()
    raise AuthenticationError("missing bearer token", reason="TOKEN_MISSING")


class AuthInterceptor(GuardInterceptor):
    """Authenticates every call except health checks before its servicer runs."""

    def __init__(self, verifier: JwtVerifier) -> None:
        self.verifier = verifier

    def check(self, context: grpc.aio.ServicerContext) -> None:
        token = bearer_token(context.invocation_metadata())
        _principal.set(self.verifier.verify(token))
