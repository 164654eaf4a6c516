"""What the configuration file says, as frozen dataclasses with documented defaults
(docs/config.md, airlock.example.toml); `gateway.config.load` fills them from the file."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from airlock.types import Limits
from gateway.config.http import HttpConfig
from gateway.config.ops import (
    AuditConfig,
    BundleConfig,
    KeysConfig,
    QuotaConfig,
    SealingConfig,
    SupervisorConfig,
    TelemetryConfig,
)
from serving.settings import S3Settings

__all__ = [
    "AuthConfig",
    "Config",
    "GatewayConfig",
    "IssuerConfig",
    "LockoutConfig",
    "ModelConfig",
    "MtlsConfig",
    "TenantConfig",
    "TlsConfig",
    "default_policy_dir",
    "default_state_dir",
]

ENGINES = ("transformers", "echo", "vllm")
ALLOWED_ALGORITHMS = ("EdDSA", "ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
ADMIN_SOCKET_NAME = "gateway-admin.sock"
MAX_UNIX_PATH_BYTES = 107  # sockaddr_un.sun_path is 108 bytes with its terminating NUL
MAX_GATEWAY_PROCESSES = 64


@dataclass(frozen=True)
class ModelConfig:
    name: str
    engine: str = "transformers"
    path: str = "bundled"  # "bundled", a local directory, or s3://BUCKET/PREFIX (docs/storage.md)
    tokens_per_second: float = 0.0
    threads: int = 0
    # True: callers' text may spell the chat template's control tokens (`<|im_start|>system`).
    allow_special_tokens: bool = False


@dataclass(frozen=True)
class TenantConfig:
    name: str
    models: tuple[str, ...]
    # model -> the GPUs (CUDA UUIDs: GPU-… or one MIG-…, as `airlock domains` prints) of its
    # worker's domain; a model not listed runs in a CPU domain.
    domains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # "dedicated": own workers; "shared": the models' shared workers (gateway/config/isolation.py)
    isolation: str = "dedicated"


@dataclass(frozen=True)
class GatewayConfig:
    listen: str = "127.0.0.1:7443"
    mtls_listen: str = "127.0.0.1:7444"  # "" disables the service (mTLS) port
    metrics_listen: str = ""  # "" disables the Prometheus endpoint
    max_message_bytes: int = 1 << 20
    grace_seconds: float = 10.0
    limits: Limits = field(default_factory=Limits)
    # The operators' Admin service (a Unix socket; its filesystem permissions are its authentication).
    # None: STATE_DIR/run/gateway-admin.sock; "": no admin socket. `Config.admin_socket` resolves it.
    admin_socket: str | None = None
    # Gateway processes on the same ports (SO_REUSEPORT, one event loop each; gateway/group.py).
    processes: int = 1


@dataclass(frozen=True)
class IssuerConfig:
    """A trusted token issuer: its keys (a local JWKS), the algorithms it may sign with, and where
    its tokens name the subject and the tenant (gateway/auth/identity.py)."""

    issuer: str = "airlock-dev"
    jwks_file: Path | None = None  # None: the dev JWKS in the state directory
    algorithms: tuple[str, ...] = ("EdDSA", "ES256")
    subject_claim: str = "sub"  # the claim (or dotted path) naming the subject
    tenant_claim: str = "tenant"  # the claim (or dotted path) naming the tenant, or mapped to one
    tenant_map: tuple[tuple[str, str], ...] = ()  # tenant_claim value -> tenant; empty: the value is one
    tenant: str = ""  # every token of this issuer is of this tenant (no tenant claim read)


@dataclass(frozen=True)
class MtlsConfig:
    """Service identities: client certificates from `[tls] service_ca` with a SPIFFE URI SAN in
    `trust_domain`."""

    trust_domain: str = "airlock.local"


@dataclass(frozen=True)
class AuthConfig:
    audience: str = "airlock"
    issuers: tuple[IssuerConfig, ...] = (IssuerConfig(),)
    leeway_seconds: int = 30
    max_token_bytes: int = 8192
    mtls: MtlsConfig = field(default_factory=MtlsConfig)
    max_token_lifetime_seconds: int = 86400  # a token's `exp - iat` may not exceed it

    @property
    def dev_issuer(self) -> IssuerConfig | None:
        """The issuer whose keys are the dev JWKS (what `airlock token` signs for), if any."""
        return next((i for i in self.issuers if i.jwks_file is None), None)


@dataclass(frozen=True)
class LockoutConfig:
    """`max_failures` policy denials of one verified identity within `window_seconds` lock it out for
    `lockout_seconds`; `max_auth_failures_per_peer` failed authentications from one address lock that
    address out (which never refuses a valid credential, gateway/auth/guard.py)."""

    max_failures: int = 10  # 0 disables the lockout of identities
    window_seconds: float = 60.0
    lockout_seconds: float = 300.0
    max_auth_failures_per_peer: int = 100  # 0 disables the lockout of peers


DEV_PKI = "pki"  # STATE_DIR/pki: the development PKI `airlock up` makes (control/pki.py)


@dataclass(frozen=True)
class TlsConfig:
    """The gateway's certificates, used exactly as given: the gateway never makes or signs one.

    Unset, each is the development PKI's file in STATE_DIR/pki, which only `airlock up` creates; a
    production gateway names its own and holds no CA private key (docs/production.md)."""

    cert: Path | None = None  # the gateway's certificate chain (its public ports; its client cert to workers)
    key: Path | None = None  # its private key
    worker_ca: Path | None = None  # CA bundle the workers' certificates chain to
    service_ca: Path | None = None  # CA bundle of service (mTLS) client certificates
    attestation_ca: Path | None = None  # CA of worker attestation identities


@dataclass(frozen=True)
class TlsFiles:
    """`TlsConfig` with every file resolved (configured, or the development PKI's)."""

    cert: Path
    key: Path
    worker_ca: Path
    service_ca: Path
    attestation_ca: Path
    dev: tuple[str, ...]  # the keys that fell back to the development PKI


@dataclass(frozen=True)
class Config:
    source: str
    state_dir: Path
    gateway: GatewayConfig
    auth: AuthConfig
    models: dict[str, ModelConfig]
    tenants: dict[str, TenantConfig]
    policy_dir: Path = field(default_factory=lambda: default_policy_dir())
    lockout: LockoutConfig = field(default_factory=LockoutConfig)
    quota: QuotaConfig = field(default_factory=QuotaConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    bundles: BundleConfig = field(default_factory=BundleConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    sealing: SealingConfig = field(default_factory=SealingConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    shared_domains: dict[str, tuple[str, ...]] = field(default_factory=dict)  # [shared] domains
    http: HttpConfig = field(default_factory=HttpConfig)  # the OpenAI-compatible door
    s3: S3Settings | None = None  # [s3]: the object store of s3:// models and the audit archive

    @property
    def model_cache_dir(self) -> Path:
        return self.state_dir / "models"

    @property
    def audit_path(self) -> Path:
        return self.audit.path or self.state_dir / "audit" / "gateway.jsonl"

    @property
    def dev_pki_dir(self) -> Path:
        return self.state_dir / DEV_PKI

    @property
    def tls_files(self) -> TlsFiles:
        """Every certificate file the gateway reads, and which of them are the development PKI's."""
        dev = self.dev_pki_dir
        defaults = {"cert": "gateway.crt", "key": "gateway.key", "worker_ca": "ca.crt",
                    "service_ca": "service-ca.crt", "attestation_ca": "attest-ca.crt"}  # fmt: skip
        chosen = {name: getattr(self.tls, name) or dev / file for name, file in defaults.items()}
        fallback = tuple(name for name in defaults if getattr(self.tls, name) is None)
        return TlsFiles(**chosen, dev=fallback)

    def jwks_file(self, issuer: IssuerConfig) -> Path:
        """An issuer's JWKS: configured, or the development PKI's (what `airlock token` signs for)."""
        return issuer.jwks_file or self.dev_pki_dir / "jwks.json"

    @property
    def audit_signing_key(self) -> Path:
        return self.audit.signing_key or self.dev_pki_dir / "audit-signing.key"

    @property
    def bundle_trusted_keys(self) -> Path:
        return self.bundles.trusted_keys or self.dev_pki_dir / "bundle-trusted.pem"

    @property
    def admin_socket(self) -> Path | None:
        """The gateway's Admin socket; None when `gateway.admin_socket = ""` disables it."""
        configured = self.gateway.admin_socket
        if configured is None:
            return self.state_dir / "run" / ADMIN_SOCKET_NAME
        return Path(configured).expanduser().absolute() if configured else None


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "airlock"


def default_policy_dir() -> Path:
    """The `policy/` directory of this installation (the checkout the packages run from)."""
    return Path(__file__).resolve().parents[2] / "policy"
