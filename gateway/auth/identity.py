"""Who is calling: a bearer JWT or an mTLS service certificate, turned into a `Principal`.

JWTs: each trusted issuer has its own local JWKS (reloaded when the file changes; never `jku`,
`x5u`, `x5c` or embedded keys) and its own asymmetric algorithm allow-list; keys are chosen by `kid`
among that issuer's keys only. `exp`, `iat`, `iss`, `aud`, `sub` and `tenant` are required, and the
issuer must be one the policy lets speak for that tenant. `exp`, `iat` and `nbf` must be numbers
(NumericDate: never strings or booleans), and `exp - iat` at most `auth.max_token_lifetime_seconds`.
Every claim that can reach a log, an audit record or a metric is bounded first (`MAX_SUBJECT_CHARS`
and friends, docs/protocol.md). Services: the identity is the SPIFFE URI
SAN (`spiffe://<trust-domain>/tenant/<t>/svc/<name>`) of a client certificate that TLS verified,
read only from the TLS auth context. Error messages carry a stable reason, never the token.

Identity from a site's identity provider (`[[auth.issuers]]`, docs/production.md): per issuer, the
subject may come from another claim (`subject_claim = "email"`) and the tenant from another claim
(`tenant_claim = "org_id"`, a name or a dotted path), through a table of claim values
(`tenant_map = { "org-123" = "acme" }`), or be fixed (`tenant = "acme"`: the issuer speaks for one
tenant). A token's group or role claims never grant anything: roles come from policy.csv's g lines.

A token that verified is remembered (bounded, by its exact text) until it expires or any JWKS is
reloaded, so a client reusing its token pays for one signature check, not one per call; the
issuer-to-tenant policy check, which can change under it, still runs on every call.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509

from airlock.errors import AuthenticationError, InvalidRequestError
from gateway.config import AuthConfig, IssuerConfig
from serving.rpc import header_value

__all__ = ["JwtVerifier", "Principal", "ServiceIdentity", "bearer_token", "load_jwks"]

_log = logging.getLogger("airlock.identity")
_TENANT = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_SERVICE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_FORBIDDEN_HEADERS = ("jku", "x5u", "x5c", "jwk")
_REQUIRED = ["exp", "iat", "iss", "aud", "sub"]
_TIMES = ("exp", "iat", "nbf")  # NumericDate claims: JSON numbers, never strings or booleans
MAX_SUBJECT_CHARS = 256  # `sub`: 1..256 printable characters
MAX_ROLES = 64  # `roles`: at most 64 entries...
MAX_ROLE_CHARS = 128  # ...of 1..128 printable characters each
CACHE_SIZE = 4096  # verified tokens remembered; a token is ~1 KiB, so a few MiB at most


@dataclass(frozen=True)
class Principal:
    subject: str  # the token's `sub`, or a service's SPIFFE ID
    tenant: str  # the home tenant, from the verified identity only
    roles: tuple[str, ...]  # roles the issuer asserted (audited; the policy's g lines grant roles)
    method: str  # how the identity was proven: "jwt" or "mtls"

    @property
    def policy_subject(self) -> str:
        """The name policy.csv uses: `TENANT/sub` for token users, the SPIFFE ID for services.

        Qualifying users by tenant means one tenant's `alice` never matches a line written for
        another tenant's `alice`."""
        return self.subject if self.method == "mtls" else f"{self.tenant}/{self.subject}"


MaySpeakFor = Callable[[str, str], bool]  # (issuer, tenant) -> allowed


class JwtVerifier:
    """Verifies bearer tokens from the configured issuers; `may_speak_for` comes from the policy."""

    def __init__(
        self,
        config: AuthConfig,
        jwks_files: Mapping[str, Path],
        may_speak_for: MaySpeakFor,
        known_tenant: Callable[[str], bool] | None = None,
    ) -> None:
        self.config = config
        self.may_speak_for = may_speak_for
        self.known_tenant = known_tenant  # whether any tenant of that name is served (the policy's)
        self.issuers: dict[str, IssuerConfig] = {i.issuer: i for i in config.issuers}
        missing = sorted(set(self.issuers) - set(jwks_files))
        if missing:
            raise ValueError(f"no JWKS file for issuer(s) {', '.join(missing)}")
        self.jwks_files = {name: jwks_files[name] for name in self.issuers}
        self._keys = {name: load_jwks(path) for name, path in self.jwks_files.items()}
        # token -> (principal, issuer, exp); only tokens that passed every check, evicted oldest first
        self._verified: OrderedDict[str, tuple[Principal, str, float]] = OrderedDict()

    def reload(self, path: Path) -> bool:
        """Load the JWKS at `path` again for every issuer using it; keep the old keys if it is bad."""
        ok = True
        self._verified.clear()  # a key may have been withdrawn: every token is checked afresh
        for name, file in self.jwks_files.items():
            if file == path:
                try:
                    self._keys[name] = load_jwks(path)
                    _log.info("JWKS reloaded", extra={"issuer": name, "keys": len(self._keys[name])})
                except ValueError as exc:
                    ok = False
                    _log.error("JWKS reload rejected; the old keys stay in use: %s", exc)
        return ok

    def verify(self, token: str) -> Principal:
        if len(token) > self.config.max_token_bytes:  # characters <= bytes: a cheap first bound
            raise AuthenticationError("token too large", reason="TOKEN_TOO_LARGE")
        hit = self._verified.get(token)
        if hit is not None and time.time() < hit[2] + self.config.leeway_seconds:  # as PyJWT's exp check
            principal, issuer, _ = hit
        else:
            self._verified.pop(token, None)
            principal, issuer, exp = self._verify(token)
            self._verified[token] = (principal, issuer, exp)
            if len(self._verified) > CACHE_SIZE:
                self._verified.popitem(last=False)
        if not self.may_speak_for(issuer, principal.tenant):
            if self.known_tenant is not None and not self.known_tenant(principal.tenant):
                # A trusted issuer's token for a tenant nobody serves: most often a typo. The name
                # is a checked tenant name (lowercase, at most 63), safe to say.
                raise AuthenticationError(
                    f"tenant {principal.tenant!r} is not served here", reason="TOKEN_TENANT_UNKNOWN"
                )
            raise AuthenticationError(
                "token issuer may not speak for this tenant", reason="TOKEN_ISSUER_NOT_ALLOWED"
            )
        return principal

    def _verify(self, token: str) -> tuple[Principal, str, float]:
        """Every check but the policy's: the principal, its issuer and the token's `exp`."""
        if len(token.encode()) > self.config.max_token_bytes:
            raise AuthenticationError("token too large", reason="TOKEN_TOO_LARGE")
        parts = token.split(".")
        if len(parts) != 3:
            raise AuthenticationError("malformed token", reason="TOKEN_MALFORMED")
        header, payload = _segment(parts[0]), _segment(parts[1])
        # Header policy runs before any library interprets the token.
        if any(h in header for h in _FORBIDDEN_HEADERS) or "crit" in header:
            raise AuthenticationError("token header not allowed", reason="TOKEN_HEADER_NOT_ALLOWED")
        iss = payload.get("iss")
        if iss is None:
            raise AuthenticationError("token lacks the 'iss' claim", reason="TOKEN_CLAIM_MISSING")
        issuer = self.issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise AuthenticationError("token issuer not trusted", reason="TOKEN_BAD_ISSUER")
        alg = header.get("alg")
        if alg not in issuer.algorithms:
            raise AuthenticationError("token algorithm not allowed", reason="TOKEN_ALGORITHM_NOT_ALLOWED")
        kid = header.get("kid")
        key = self._keys[issuer.issuer].get(kid) if isinstance(kid, str) else None
        if key is None:
            raise AuthenticationError("token signed by an unknown key", reason="TOKEN_UNKNOWN_KEY")
        if key.algorithm_name != alg:
            raise AuthenticationError("token algorithm does not match its key", reason="TOKEN_KEY_MISMATCH")
        _check_shapes(payload)
        claims = self._decode(token, key, alg, issuer)
        exp = self._check_lifetime(claims)
        principal = Principal(
            subject=_subject(claims, issuer.subject_claim),
            tenant=_tenant(claims, issuer),
            roles=_roles(claims),
            method="jwt",
        )
        return principal, issuer.issuer, exp

    def _check_lifetime(self, claims: dict[str, Any]) -> float:
        """The token's `exp`, once `exp - iat` is within the configured maximum lifetime.

        PyJWT refused an `iat` in the future (beyond the leeway), so a token accepted here expires
        at most `max_token_lifetime_seconds` + leeway from now, whatever its `nbf` says."""
        exp, iat = float(claims["exp"]), float(claims["iat"])  # finite numbers (_check_shapes)
        if exp - iat > self.config.max_token_lifetime_seconds:
            raise AuthenticationError(
                f"token lifetime (exp - iat) exceeds {self.config.max_token_lifetime_seconds} s",
                reason="TOKEN_LIFETIME_TOO_LONG",
            )
        return exp

    def _decode(self, token: str, key: jwt.PyJWK, alg: str, issuer: IssuerConfig) -> dict[str, Any]:
        # `sub` is required unless the subject comes from another claim (checked by _subject).
        required = _REQUIRED if issuer.subject_claim == "sub" else [c for c in _REQUIRED if c != "sub"]
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self.config.audience,
                issuer=issuer.issuer,
                leeway=self.config.leeway_seconds,
                options={"require": required},
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
        except (jwt.ImmatureSignatureError, jwt.InvalidIssuedAtError):
            raise AuthenticationError("token not valid yet", reason="TOKEN_NOT_YET_VALID") from None
        except jwt.InvalidSignatureError:
            raise AuthenticationError("token signature invalid", reason="TOKEN_BAD_SIGNATURE") from None
        except jwt.PyJWTError:
            raise AuthenticationError("token invalid", reason="TOKEN_INVALID") from None
        return claims


class ServiceIdentity:
    """Turns the verified client certificate of an mTLS call into a service `Principal`."""

    def __init__(self, trust_domain: str) -> None:
        self.prefix = f"spiffe://{trust_domain}/"

    def principal(self, auth_context: Mapping[str, Any]) -> Principal | None:
        """None when the call carries no client certificate (it was made on the token port).

        gRPC puts a peer certificate in the auth context only after the TLS handshake verified it
        against the service CA, and only on the port that requires one."""
        pems = auth_context.get("x509_pem_cert") or []
        if not pems:
            return None
        try:
            cert = x509.load_pem_x509_certificate(pems[0])
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        except (ValueError, x509.ExtensionNotFound):
            uris = []
        spiffe = [u for u in uris if u.startswith("spiffe://")]
        if len(spiffe) != 1:
            raise AuthenticationError(
                "client certificate needs exactly one SPIFFE URI SAN", reason="CERT_NO_SPIFFE_ID"
            )
        spiffe_id = spiffe[0]
        if not spiffe_id.startswith(self.prefix):
            raise AuthenticationError("client certificate from another trust domain",
                                      reason="CERT_BAD_TRUST_DOMAIN")  # fmt: skip
        match = re.fullmatch(r"tenant/([^/]+)/svc/([^/]+)", spiffe_id[len(self.prefix) :])
        if not match or not _TENANT.fullmatch(match[1]) or not _SERVICE.fullmatch(match[2]):
            raise AuthenticationError(
                "SPIFFE ID must be spiffe://<trust-domain>/tenant/<tenant>/svc/<name>",
                reason="CERT_BAD_SPIFFE_ID",
            )
        return Principal(subject=spiffe_id, tenant=match[1], roles=(), method="mtls")


def _invalid(claim: str, why: str) -> AuthenticationError:
    return AuthenticationError(f"token {claim!r} claim {why}", reason="TOKEN_CLAIM_INVALID")


def _check_shapes(payload: dict[str, Any]) -> None:
    """`exp`, `iat` and `nbf`, where present, are finite JSON numbers (RFC 7519 NumericDate), and
    `sub` and `jti` strings: each refused with its own reason before PyJWT reads them (it would
    read `"exp": "99999999999"` as a time and `true` as 1, and call a numeric `sub` TOKEN_INVALID)."""
    for claim in ("sub", "jti"):
        if claim in payload and not isinstance(payload[claim], str):
            raise _invalid(claim, "must be a string")
    for claim in _TIMES:
        value = payload.get(claim)
        if value is None:
            continue  # absent: PyJWT's required-claim check names it (nbf is optional)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _invalid(claim, "must be a number (seconds since the epoch)")
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer too large for a float
            finite = False
        if not finite:
            raise _invalid(claim, "is not a usable time")


def _printable(value: str, limit: int) -> bool:
    """1..limit characters, none of them a control, format or line/paragraph separator character
    (str.isprintable: the ASCII space is the only space allowed), so it is safe in a log line."""
    return 0 < len(value) <= limit and value.isprintable()


def claim(claims: dict[str, Any], name: str) -> Any:
    """A claim by name (`email`, `https://example.com/org`) or, when no claim has that name, by a
    dotted path into nested objects (`org.id`); None when absent."""
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _subject(claims: dict[str, Any], name: str = "sub") -> str:
    subject = claim(claims, name)
    if subject is None or subject == "":
        raise AuthenticationError(f"token lacks the {name!r} claim", reason="TOKEN_CLAIM_MISSING")
    if not isinstance(subject, str) or not _printable(subject, MAX_SUBJECT_CHARS):
        raise _invalid(name, f"must be 1..{MAX_SUBJECT_CHARS} printable characters")
    return subject


def _tenant(claims: dict[str, Any], issuer: IssuerConfig | None = None) -> str:
    """The token's tenant: the issuer's fixed one, its claim's value mapped through the issuer's
    table, or the claim's value itself (which must then be a tenant name)."""
    if issuer is not None and issuer.tenant:
        return issuer.tenant
    name = issuer.tenant_claim if issuer is not None else "tenant"
    value = claim(claims, name)
    if value is None or value == "":
        raise AuthenticationError(f"token lacks the {name!r} claim", reason="TOKEN_CLAIM_MISSING")
    if issuer is not None and issuer.tenant_map:
        mapped = dict(issuer.tenant_map).get(value) if isinstance(value, str) else None
        if mapped is None:  # the value is the IdP's, unbounded: never repeated
            raise AuthenticationError(
                f"token's {name!r} claim names no tenant of this issuer (auth.issuers tenant_map)",
                reason="TOKEN_TENANT_UNMAPPED",
            )
        return mapped
    if not isinstance(value, str) or not _TENANT.fullmatch(value):
        raise _invalid(name, "must be a tenant name: lowercase letters, digits and '-' (at most 63)")
    return value


def _roles(claims: dict[str, Any]) -> tuple[str, ...]:
    roles = claims.get("roles", [])
    if not isinstance(roles, list) or len(roles) > MAX_ROLES:
        raise _invalid("roles", f"must be a list of at most {MAX_ROLES} role names")
    if not all(isinstance(r, str) and _printable(r, MAX_ROLE_CHARS) for r in roles):
        raise _invalid("roles", f"entries must be 1..{MAX_ROLE_CHARS} printable characters")
    return tuple(roles)


def _segment(text: str) -> dict[str, Any]:
    try:
        value = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, binascii.Error):  # json and unicode errors are ValueErrors too
        raise AuthenticationError("malformed token", reason="TOKEN_MALFORMED") from None
    if not isinstance(value, dict):
        raise AuthenticationError("malformed token", reason="TOKEN_MALFORMED")
    return value


def load_jwks(path: Path) -> dict[str, jwt.PyJWK]:
    """The asymmetric public keys of a local JWKS file, by `kid`; refuses symmetric or private keys."""
    try:
        data = json.loads(path.read_text())
        keys = {}
        for entry in data["keys"]:
            if not isinstance(entry, dict) or not entry.get("kid") or not isinstance(entry["kid"], str):
                raise ValueError("a key has no 'kid'")
            if entry.get("kty") not in ("OKP", "EC", "RSA"):
                raise ValueError(f"key {entry['kid']!r}: only asymmetric keys (OKP, EC, RSA) are accepted")
            if "d" in entry:
                raise ValueError(f"key {entry['kid']!r} is a private key; a JWKS holds public keys only")
            if entry["kid"] in keys:
                raise ValueError(f"two keys have kid {entry['kid']!r}")
            keys[entry["kid"]] = jwt.PyJWK(entry)
    except (OSError, ValueError, KeyError, TypeError, jwt.PyJWTError) as exc:
        raise ValueError(f"{path}: cannot load JWKS ({type(exc).__name__}: {exc})") from None
    if not keys:
        raise ValueError(f"{path}: JWKS has no keys")
    return keys


def bearer_token(metadata: Any) -> str | None:
    """The bearer token of the call, None when there is no authorization header."""
    try:
        value = header_value(metadata, "authorization")
    except InvalidRequestError:
        raise AuthenticationError("send one authorization header", reason="TOKEN_MALFORMED") from None
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("authorization must be 'Bearer <token>'", reason="TOKEN_MALFORMED")
    return token.strip()
