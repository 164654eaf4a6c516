"""Every `reason` Airlock raises, in one table: its status code(s), who can see it, what it means.

Reasons are stable API: callers branch on them. Each one raised anywhere in airlock/, serving/,
gateway/ or worker/ is registered here, and each one a caller can see is in the error table of
docs/protocol.md, which lists none that is not here (tests/airlock/test_reasons.py checks all three).
A new reason is added here, documented there, and raised with the error class of its code.

Audiences: `CALLER`, the gateway answers callers with it; `SDK`, the SDK raises it in the caller's
process (from a status without an Airlock reason, or on its own); `INTERNAL`, it passes between
gateway and worker only (the gateway answers the caller with another) or is never sent; `OPERATOR`,
a file refused at start-up or by the CLI, never a gRPC status.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from grpc import StatusCode

__all__ = ["REASONS", "Audience", "Reason"]


class Audience(enum.Enum):
    CALLER = "caller"
    SDK = "sdk"
    INTERNAL = "internal"
    OPERATOR = "operator"


@dataclass(frozen=True)
class Reason:
    codes: tuple[StatusCode, ...]  # the usual one first; empty for an OPERATOR reason
    meaning: str
    audience: Audience = Audience.CALLER

    @property
    def visible(self) -> bool:
        """Whether a caller can meet it (so docs/protocol.md must list it)."""
        return self.audience in (Audience.CALLER, Audience.SDK)


def _group(codes: tuple[StatusCode, ...], audience: Audience, /, **meanings: str) -> dict[str, Reason]:
    return {name: Reason(codes, meaning, audience) for name, meaning in meanings.items()}


def _registry(*groups: dict[str, Reason]) -> Mapping[str, Reason]:
    table: dict[str, Reason] = {}
    for group in groups:
        if twice := table.keys() & group.keys():
            raise ValueError(f"reasons registered twice: {sorted(twice)}")
        table.update(group)
    return MappingProxyType(table)


CALLER, SDK, INTERNAL, OPERATOR = Audience.CALLER, Audience.SDK, Audience.INTERNAL, Audience.OPERATOR
_SEAL = (StatusCode.INVALID_ARGUMENT, StatusCode.INTERNAL)  # the caller's payload, or the worker's answer

REASONS = _registry(
    _group((StatusCode.UNAUTHENTICATED,), CALLER,
        TOKEN_MISSING="no bearer token and no client certificate",
        TOKEN_MALFORMED="not one `authorization: Bearer <JWT>` header, or not a JWT",
        TOKEN_TOO_LARGE="the token is over auth.max_token_bytes",
        TOKEN_EXPIRED="the token's exp has passed",
        TOKEN_NOT_YET_VALID="the token's nbf is in the future",
        TOKEN_BAD_AUDIENCE="the token's aud is not this gateway's",
        TOKEN_BAD_ISSUER="the token's iss is not a configured issuer",
        TOKEN_ISSUER_NOT_ALLOWED="the issuer may not speak for the token's tenant",
        TOKEN_TENANT_UNKNOWN="the token's tenant is not served here (no such tenant in the policy)",
        TOKEN_TENANT_UNMAPPED="the token's tenant claim is none of the issuer's tenant_map values",
        TOKEN_BAD_SIGNATURE="the token's signature does not verify",
        TOKEN_UNKNOWN_KEY="the token's kid is none of the issuer's keys",
        TOKEN_KEY_MISMATCH="the token's alg does not match its key",
        TOKEN_ALGORITHM_NOT_ALLOWED="the token's alg is not allowed",
        TOKEN_HEADER_NOT_ALLOWED="the token's header names a key to fetch (jku, x5u)",
        TOKEN_CLAIM_MISSING="a required claim is absent or empty",
        TOKEN_CLAIM_INVALID="a claim is over its limit or of the wrong type",
        TOKEN_LIFETIME_TOO_LONG="exp - iat is over auth.max_token_lifetime_seconds",
        TOKEN_INVALID="the token is refused for another reason",
        CERT_NO_SPIFFE_ID="the client certificate has not exactly one SPIFFE ID",
        CERT_BAD_TRUST_DOMAIN="the SPIFFE ID is of another trust domain",
        CERT_BAD_SPIFFE_ID="the SPIFFE ID is not spiffe://TD/tenant/NAME/svc/NAME",
        IDENTITY_AMBIGUOUS="both a client certificate and a bearer token",
    ),
    _group((StatusCode.UNAUTHENTICATED, StatusCode.PERMISSION_DENIED), CALLER,
        LOCKED_OUT="too many failed authentications from the address, or denials of the identity",
    ),
    _group((StatusCode.UNAUTHENTICATED,), SDK,
        TOKEN_PROVIDER_FAILED="the SDK's token provider raised, or returned no token",
        UNAUTHENTICATED="UNAUTHENTICATED without a reason (not from an Airlock server)",
    ),
    _group((StatusCode.PERMISSION_DENIED,), CALLER,
        POLICY_DENIED="the policy does not allow the subject this action on this resource",
        TENANT_INVALID="x-airlock-tenant is not a tenant name",
        TENANT_NOT_SERVED="no worker of this gateway serves the tenant",
        TENANT_UNKNOWN="the tenant is not in the policy in service (no quota to spend)",
    ),
    _group((StatusCode.PERMISSION_DENIED,), SDK,
        PERMISSION_DENIED="PERMISSION_DENIED without a reason (not from an Airlock server)",
    ),
    _group((StatusCode.PERMISSION_DENIED,), INTERNAL,
        PEER_NOT_ALLOWED="a worker called with another certificate than the gateway's",
    ),
    _group((StatusCode.PERMISSION_DENIED, StatusCode.INVALID_ARGUMENT), INTERNAL,
        WRONG_TENANT="a worker, or its engine, asked to serve a tenant it does not",
    ),
    _group((StatusCode.INVALID_ARGUMENT,), CALLER,
        INVALID_ARGUMENT="a field is out of its limits; the error's field names it",
        MALFORMED_REQUEST="the request bytes are not a valid protobuf message (HTTP: a JSON object)",
        UNSUPPORTED_FIELD="HTTP: an OpenAI request field the gateway does not serve, set to ask for it",
        HEADER_REPEATED="a metadata entry the server reads was sent more than once",
        REQUEST_ID_INVALID="the request id is not 1..64 of A-Za-z0-9._-",
        REQUEST_ID_MISMATCH="the x-request-id header and the body's request_id differ",
        MODEL_INVALID="the model name is not one a model can have",
        UNKNOWN_MODEL="the tenant has no such model (said only to an authorized caller)",
        PROMPT_TOO_LONG="the prompt is longer than the model's context",
        SPECIAL_TOKEN_IN_CONTENT="a message spells a chat-template control token that can't stay text",
        ROUTE_INVALID="admin socket: a route to set is malformed (name, engine, address) or named twice",
        ROUTE_REFUSED="admin socket: a tenant to route is not in the policy in service or has no active key",
    ),
    _group((StatusCode.INVALID_ARGUMENT,), INTERNAL,
        PLAINTEXT_REFUSED="a worker got a prompt that was not sealed",
        SEAL_MIXED="a worker request both sealed and plain",
        SEAL_INVALID="SealError's default; every raise names a more precise reason",
    ),
    _group(_SEAL, CALLER,
        SEAL_MALFORMED="a sealed payload or its header is malformed, or an end-to-end request lacks a part",
        SEAL_TAMPERED="a sealed payload failed authentication",
        SEAL_VERSION="a sealed payload of an envelope version this side does not know",
        SEAL_WRONG_TENANT="a sealed payload of another tenant",
        SEAL_WRONG_KEY="a sealed payload under another key",
        SEAL_WRONG_REQUEST="a sealed payload of another request, direction or model",
        SEAL_WRONG_STREAM="a sealed chunk of another stream",
        SEAL_OUT_OF_ORDER="a sealed chunk out of sequence",
        SEAL_AFTER_FINAL="a sealed chunk after the final one",
        SEAL_TRUNCATED="a sealed stream that ended before its final chunk",
    ),
    _group((StatusCode.RESOURCE_EXHAUSTED,), CALLER,
        RATE_LIMITED="the home tenant's requests_per_second is spent (any method)",
        TOKEN_QUOTA_EXCEEDED="the tenant's tokens_per_minute is spent",
        CONCURRENCY_LIMITED="the tenant has concurrent_streams calls in flight",
        BODY_TOO_LARGE="HTTP: the request body is over gateway.max_message_bytes (status 413)",
        HEADERS_TOO_LARGE="HTTP: the request line and headers are over http.max_header_bytes (status 431)",
    ),
    _group((StatusCode.RESOURCE_EXHAUSTED,), SDK,
        QUOTA_EXCEEDED="RESOURCE_EXHAUSTED without a reason: gRPC's own refusal of an oversize message",
    ),
    _group((StatusCode.UNAVAILABLE,), CALLER,
        WORKER_UNAVAILABLE="the tenant's worker is down, restarting or did not answer",
        QUOTA_STORE_UNAVAILABLE="the shared quota store (Redis) can't be reached",
        AUDIT_UNAVAILABLE="the audit log can't be written: every call is refused",
        TENANT_KEY_MISSING="the tenant has no active sealing key",
        KEYSTORE_BUSY="the keystore kept changing while the tenant's keys were read for release",
        TOO_MANY_STREAMS="HTTP: the door holds http.max_streams event streams open already",
    ),
    _group((StatusCode.UNAVAILABLE,), SDK,
        UNAVAILABLE="UNAVAILABLE without a reason: gRPC's own (no connection to the gateway)",
        CONNECT_REFUSED="no connection: nothing listens on the address",
        ADDRESS_UNRESOLVED="no connection: the address's host does not resolve",
        TLS_NOT_SPOKEN="no connection: the port does not speak TLS (a plaintext port)",
        TLS_UNTRUSTED="no connection: the server's certificate is not signed by the CA given",
        TLS_NAME_MISMATCH="no connection: the server's certificate does not name the host connected to",
        TLS_CLIENT_CERT_REQUIRED="no connection: the server wants a client certificate (the mTLS port)",
        TLS_CLIENT_CERT_REFUSED="no connection: the server did not accept the client certificate",
    ),
    _group((StatusCode.UNAVAILABLE, StatusCode.CANCELLED), SDK,
        SERVER_CANCELLED="the server cancelled the call (it is shutting down): retry",
    ),
    _group((StatusCode.UNAVAILABLE,), INTERNAL,
        KV_SCRUB_FAILED="a shared vLLM engine could not scrub its KV cache between tenants",
    ),
    _group((StatusCode.FAILED_PRECONDITION,), CALLER,
        ATTESTATION_INSUFFICIENT="the evidence's level is below the policy's",
        ATTESTATION_MEASUREMENT="a measurement is not one the policy allows",
        ATTESTATION_STALE="evidence not for this nonce or too old, or sealed to a worker since restarted",
        ATTESTATION_UNTRUSTED="the evidence certificate is not the attestation CA's, or not valid now",
        ATTESTATION_BAD_SIGNATURE="the evidence signature does not verify",
        ATTESTATION_WRONG_TENANT="the evidence is another tenant's worker's",
        ATTESTATION_MALFORMED="the evidence statement is malformed",
        ATTESTATION_SUITE="the worker's HPKE suite is not one the deployment accepts",
        ATTESTATION_BAD_KEY="the evidence's HPKE public key is malformed",
        ISOLATION_NOT_ALLOWED="a shared worker, and the policy does not opt the tenant in",
        KEYS_MISSING="the worker holds no such tenant key, still after it was attested again",
        KEY_UNSEAL_FAILED="end to end: the request key does not open with the worker's key",
    ),
    _group((StatusCode.FAILED_PRECONDITION,), SDK,
        ATTESTATION_WRONG_MODEL="end to end: the evidence is for another model than asked",
    ),
    _group((StatusCode.FAILED_PRECONDITION,), INTERNAL,
        ATTESTATION_BAD_SUITE="an HPKE suite name this build does not know",
        ATTESTATION_BAD_NONCE="a worker asked for evidence with a nonce not 16..64 bytes",
        KEY_WRONG_TENANT="keys released to a worker for a tenant it does not serve",
        KEY_WRONG_WORKER="keys released to a worker sealed to another worker key",
        KEY_REPLAYED="a key release that answers no evidence the worker gave",
        KEY_MALFORMED="a released key set that is malformed",
    ),
    _group((StatusCode.DEADLINE_EXCEEDED,), CALLER,
        DEADLINE_EXCEEDED="the caller's deadline passed",
        BODY_TIMEOUT="HTTP: the request body did not arrive within http.body_timeout_seconds (status 408)",
    ),
    _group((StatusCode.UNIMPLEMENTED,), CALLER,
        UNKNOWN_ROUTE="HTTP: no such path (status 404), or not with this method (405)",
    ),
    _group((StatusCode.CANCELLED,), INTERNAL,
        CANCELLED="the caller went away (audit and metrics only)",
    ),
    _group((StatusCode.INTERNAL,), CALLER,
        INTERNAL="anything unexpected: the details are in the log under the request id",
        WORKER_FAILED="the worker failed in a way that is not the caller's to know",
    ),
    _group((), OPERATOR,
        BUNDLE_UNSIGNED="a model directory without a signed manifest",
        BUNDLE_SIGNATURE_INVALID="the manifest's signature is unreadable or does not verify",
        BUNDLE_KEY_UNTRUSTED="the manifest is signed by a key not among the trusted ones",
        BUNDLE_KEY_INVALID="a signing or trusted key that is not Ed25519",
        BUNDLE_KEYS_UNREADABLE="the trusted keys file can't be read",
        BUNDLE_KEYS_EMPTY="the trusted keys file holds no key",
        BUNDLE_MANIFEST_INVALID="the manifest is not one this version reads",
        BUNDLE_FILE_MISSING="a file of the manifest is missing",
        BUNDLE_FILE_EXTRA="a file that is not in the manifest",
        BUNDLE_FILE_ALTERED="a file whose digest differs from the manifest's",
        BUNDLE_LINK="a symbolic link in a model directory",
        STORAGE_URL_INVALID="not s3://BUCKET[/PREFIX]",
        STORAGE_CREDENTIALS="no usable object-store credentials (file unreadable or too open, no variables)",
        STORAGE_NOT_FOUND="no such bucket or object in the object store",
        STORAGE_DENIED="the object store refused (a locked object, a missing permission, no Object Lock)",
        STORAGE_UNAVAILABLE="the object store can't be reached or failed",
    ),
)  # fmt: skip
