"""The one TOML configuration file, parsed once at start-up into a frozen `Config`.

Every key has a documented default (docs/config.md, airlock.example.toml). A bad file raises
`ConfigError` naming the file, the key and the reason; the CLI prints it and exits with code 2.
The operations sections live in gateway/config/ops.py and isolation in gateway/config/isolation.py;
every section's dataclass is importable from here.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from airlock.types import Limits
from gateway.config.isolation import parse_shared_domains, parse_tenant_isolation
from gateway.config.ops import (
    AuditConfig,
    BundleConfig,
    FileKeysConfig,
    KeysConfig,
    Pkcs11KeysConfig,
    QuotaConfig,
    SealingConfig,
    SupervisorConfig,
    TelemetryConfig,
    parse_audit,
    parse_bundles,
    parse_keys,
    parse_quota,
    parse_sealing,
    parse_supervisor,
    parse_telemetry,
)

__all__ = [
    "AuditConfig",
    "AuthConfig",
    "BundleConfig",
    "Config",
    "ConfigError",
    "FileKeysConfig",
    "GatewayConfig",
    "IssuerConfig",
    "KeysConfig",
    "LockoutConfig",
    "ModelConfig",
    "MtlsConfig",
    "Pkcs11KeysConfig",
    "QuotaConfig",
    "SealingConfig",
    "SupervisorConfig",
    "TelemetryConfig",
    "TenantConfig",
    "load",
]

ENGINES = ("transformers", "echo", "vllm")
ALLOWED_ALGORITHMS = ("EdDSA", "ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
ADMIN_SOCKET_NAME = "gateway-admin.sock"
MAX_UNIX_PATH_BYTES = 107  # sockaddr_un.sun_path is 108 bytes with its terminating NUL
T = TypeVar("T")


class ConfigError(Exception):
    def __init__(self, source: str, key: str, reason: str) -> None:
        super().__init__(f"{source}: {key}: {reason}")
        self.source, self.key, self.reason = source, key, reason


@dataclass(frozen=True)
class ModelConfig:
    name: str
    engine: str = "transformers"
    path: str = "bundled"
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


@dataclass(frozen=True)
class IssuerConfig:
    """A trusted token issuer: its keys (a local JWKS) and the algorithms it may sign with."""

    issuer: str = "airlock-dev"
    jwks_file: Path | None = None  # None: the dev JWKS in the state directory
    algorithms: tuple[str, ...] = ("EdDSA", "ES256")


@dataclass(frozen=True)
class MtlsConfig:
    """Service identities: client certificates from `ca_file` with a SPIFFE URI SAN in `trust_domain`."""

    ca_file: Path | None = None  # None: the dev service CA in the state directory
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
    shared_domains: dict[str, tuple[str, ...]] = field(default_factory=dict)  # [shared] domains

    @property
    def model_cache_dir(self) -> Path:
        return self.state_dir / "models"

    @property
    def audit_path(self) -> Path:
        return self.audit.path or self.state_dir / "audit" / "gateway.jsonl"

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


DEFAULT_TOML = """
[models.smollm2]
engine = "transformers"
path = "bundled"

[tenants.acme]
models = ["smollm2"]

[tenants.globex]
models = ["smollm2"]
"""


def load(path: Path | None = None, *, state_dir: Path | None = None) -> Config:
    """Parse `path` (or the built-in defaults: two demo tenants on the bundled model)."""
    if path is None:
        source, raw = "<defaults>", tomllib.loads(DEFAULT_TOML)
    else:
        source = str(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(source, "-", f"cannot read file ({exc.strerror})") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(source, "-", f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(source, "-", f"not valid TOML ({exc})") from None
    return _Parser(source).config(raw, state_dir)


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.source, key, reason)

    def table(self, raw: dict[str, Any], key: str, allowed: set[str]) -> dict[str, Any]:
        value = raw.get(key.rsplit(".", 1)[-1], {})
        if not isinstance(value, dict):
            raise self.fail(key, "must be a table")
        for unknown in sorted(set(value) - allowed):
            raise self.fail(f"{key}.{unknown}", "unknown key")
        return value

    def get(self, table: dict[str, Any], key: str, kind: type[T], default: T) -> T:
        name = key.rsplit(".", 1)[-1]
        if name not in table:
            return default
        value = table[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(key, f"must be {kind.__name__}, got {type(value).__name__}")
        return value

    def positive(self, table: dict[str, Any], key: str, default: int) -> int:
        value = self.get(table, key, int, default)
        if value <= 0:
            raise self.fail(key, f"must be a positive integer, got {value}")
        return value

    def config(self, raw: dict[str, Any], state_dir: Path | None) -> Config:
        top = {"state_dir", "policy_dir", "gateway", "auth", "lockout", "models", "tenants", "supervisor"}
        top |= {"quota", "telemetry", "audit", "bundles", "keys", "sealing", "shared"}
        for unknown in sorted(set(raw) - top):
            raise self.fail(unknown, "unknown key")
        configured_state = self.get(raw, "state_dir", str, "")
        state = state_dir or (Path(configured_state).expanduser() if configured_state else None)
        models = self.models(raw)
        policy = self.get(raw, "policy_dir", str, "")
        policy_dir = Path(policy).expanduser().absolute() if policy else default_policy_dir()
        if not policy_dir.is_dir():
            raise self.fail("policy_dir", f"{str(policy_dir)!r} is not a directory")
        tenants = self.tenants(raw, models)
        return Config(
            source=self.source,
            state_dir=(state or default_state_dir()).absolute(),
            gateway=self.gateway(raw),
            auth=self.auth(raw),
            models=models,
            tenants=tenants,
            policy_dir=policy_dir,
            lockout=self.lockout(raw),
            quota=parse_quota(self, raw),
            telemetry=parse_telemetry(self, raw),
            audit=parse_audit(self, raw),
            bundles=parse_bundles(self, raw),
            keys=parse_keys(self, raw),
            supervisor=parse_supervisor(self, raw),
            sealing=parse_sealing(self, raw),
            shared_domains=parse_shared_domains(self, raw, tenants),
        )

    def gateway(self, raw: dict[str, Any]) -> GatewayConfig:
        keys = {
            "listen", "mtls_listen", "metrics_listen", "max_message_bytes", "grace_seconds", "max_tokens",
            "default_max_tokens", "admin_socket",
        }  # fmt: skip
        t = self.table(raw, "gateway", keys)
        d, dl = GatewayConfig(), Limits()
        listen = self.address(t, "gateway.listen", d.listen, optional=False)
        max_tokens = self.positive(t, "gateway.max_tokens", dl.max_tokens)
        # Unset, the default follows a lowered limit instead of contradicting it.
        default_max = self.positive(t, "gateway.default_max_tokens", min(dl.default_max_tokens, max_tokens))
        if default_max > max_tokens:
            raise self.fail("gateway.default_max_tokens", "must not exceed gateway.max_tokens")
        grace = self.get(t, "gateway.grace_seconds", float, d.grace_seconds)
        if grace < 0:
            raise self.fail("gateway.grace_seconds", "must be >= 0")
        return GatewayConfig(
            listen=listen,
            mtls_listen=self.address(t, "gateway.mtls_listen", d.mtls_listen, optional=True),
            metrics_listen=self.address(t, "gateway.metrics_listen", d.metrics_listen, optional=True),
            max_message_bytes=self.positive(t, "gateway.max_message_bytes", d.max_message_bytes),
            grace_seconds=grace,
            limits=Limits(max_tokens=max_tokens, default_max_tokens=default_max),
            admin_socket=self.admin_socket(t),
        )

    def admin_socket(self, table: dict[str, Any]) -> str | None:
        if "admin_socket" not in table:
            return None
        value = self.get(table, "gateway.admin_socket", str, "")
        if value and len(os.fsencode(str(Path(value).expanduser().absolute()))) > MAX_UNIX_PATH_BYTES:
            raise self.fail("gateway.admin_socket", f"a Unix socket path is at most {MAX_UNIX_PATH_BYTES} B")
        return value

    def address(self, table: dict[str, Any], key: str, default: str, *, optional: bool) -> str:
        value = self.get(table, key, str, default)
        if optional and value == "":
            return value
        port = re.fullmatch(r".+:(\d{1,5})", value)
        if not port or int(port.group(1)) > 65535:
            blank = ' (or "" to disable)' if optional else ""
            raise self.fail(key, f"must be HOST:PORT with a port up to 65535{blank}, got {value!r}")
        return value

    def auth(self, raw: dict[str, Any]) -> AuthConfig:
        keys = {"audience", "issuers", "leeway_seconds", "max_token_bytes", "mtls"}
        keys.add("max_token_lifetime_seconds")
        t = self.table(raw, "auth", keys)
        d = AuthConfig()
        leeway = self.get(t, "auth.leeway_seconds", int, d.leeway_seconds)
        if not 0 <= leeway <= 300:
            raise self.fail("auth.leeway_seconds", "must be between 0 and 300")
        entries = self.get(t, "auth.issuers", list, [])
        issuers = tuple(self.issuer(entry, f"auth.issuers[{i}]") for i, entry in enumerate(entries))
        names = [i.issuer for i in issuers]
        if len(set(names)) != len(names):
            raise self.fail("auth.issuers", "lists an issuer twice")
        m = self.table(t, "auth.mtls", {"ca_file", "trust_domain"})
        ca = self.get(m, "auth.mtls.ca_file", str, "")
        domain = self.get(m, "auth.mtls.trust_domain", str, MtlsConfig().trust_domain)
        if not re.fullmatch(r"[a-z0-9._-]+", domain):
            raise self.fail("auth.mtls.trust_domain", "must be lowercase letters, digits, '.', '-' and '_'")
        return AuthConfig(
            audience=self.get(t, "auth.audience", str, d.audience),
            issuers=issuers or d.issuers,
            leeway_seconds=leeway,
            max_token_bytes=self.positive(t, "auth.max_token_bytes", d.max_token_bytes),
            mtls=MtlsConfig(ca_file=Path(ca).expanduser() if ca else None, trust_domain=domain),
            max_token_lifetime_seconds=self.positive(
                t, "auth.max_token_lifetime_seconds", d.max_token_lifetime_seconds
            ),
        )

    def issuer(self, raw: Any, key: str) -> IssuerConfig:
        if not isinstance(raw, dict):
            raise self.fail(key, "must be a table ([[auth.issuers]])")
        for unknown in sorted(set(raw) - {"issuer", "jwks_file", "algorithms"}):
            raise self.fail(f"{key}.{unknown}", "unknown key")
        d = IssuerConfig()
        name = self.get(raw, f"{key}.issuer", str, "")
        if not name:
            raise self.fail(f"{key}.issuer", "is required (the tokens' `iss`)")
        algorithms = tuple(self.get(raw, f"{key}.algorithms", list, list(d.algorithms)))
        for alg in algorithms:
            if alg not in ALLOWED_ALGORITHMS:
                raise self.fail(
                    f"{key}.algorithms",
                    f"{alg!r} is not allowed (asymmetric only: {', '.join(ALLOWED_ALGORITHMS)})",
                )
        if not algorithms:
            raise self.fail(f"{key}.algorithms", "must list at least one algorithm")
        jwks = self.get(raw, f"{key}.jwks_file", str, "")
        return IssuerConfig(issuer=name, jwks_file=Path(jwks).expanduser() if jwks else None,
                            algorithms=algorithms)  # fmt: skip

    def lockout(self, raw: dict[str, Any]) -> LockoutConfig:
        keys = {"max_failures", "window_seconds", "lockout_seconds", "max_auth_failures_per_peer"}
        t = self.table(raw, "lockout", keys)
        d = LockoutConfig()
        failures = self.get(t, "lockout.max_failures", int, d.max_failures)
        if failures < 0:
            raise self.fail("lockout.max_failures", "must be >= 0 (0 disables lockout)")
        per_peer = self.get(t, "lockout.max_auth_failures_per_peer", int, d.max_auth_failures_per_peer)
        if per_peer < 0:
            raise self.fail("lockout.max_auth_failures_per_peer", "must be >= 0 (0 disables it)")
        window = self.get(t, "lockout.window_seconds", float, d.window_seconds)
        duration = self.get(t, "lockout.lockout_seconds", float, d.lockout_seconds)
        for key, value in (("lockout.window_seconds", window), ("lockout.lockout_seconds", duration)):
            if value <= 0:
                raise self.fail(key, "must be > 0")
        return LockoutConfig(failures, window, duration, per_peer)

    def models(self, raw: dict[str, Any]) -> dict[str, ModelConfig]:
        t = raw.get("models", {})
        if not isinstance(t, dict) or not t:
            raise self.fail("models", "must define at least one [models.NAME] table")
        out = {}
        for name in t:
            key = f"models.{name}"
            if not _NAME.fullmatch(name):
                raise self.fail(key, "name must be lowercase letters, digits and '-'")
            m = self.table(t, key, {"engine", "path", "tokens_per_second", "threads", "allow_special_tokens"})
            engine = self.get(m, f"{key}.engine", str, "transformers")
            if engine not in ENGINES:
                raise self.fail(f"{key}.engine", f"must be one of {', '.join(ENGINES)}")
            rate = self.get(m, f"{key}.tokens_per_second", float, 0.0)
            if rate < 0:
                raise self.fail(f"{key}.tokens_per_second", "must be >= 0")
            threads = self.get(m, f"{key}.threads", int, 0)
            if threads < 0:
                raise self.fail(f"{key}.threads", "must be >= 0")
            path = self.get(m, f"{key}.path", str, "bundled")
            if engine == "vllm" and path == "bundled":
                raise self.fail(f"{key}.path", "the vllm engine needs a local model directory")
            if engine != "echo" and path != "bundled" and not Path(path).expanduser().is_dir():
                raise self.fail(f"{key}.path", f"{path!r} is not a directory")
            allow_special = self.get(m, f"{key}.allow_special_tokens", bool, False)
            out[name] = ModelConfig(name, engine, path, rate, threads, allow_special)
        return out

    def tenants(self, raw: dict[str, Any], models: dict[str, ModelConfig]) -> dict[str, TenantConfig]:
        t = raw.get("tenants", {})
        if not isinstance(t, dict) or not t:
            raise self.fail("tenants", "must define at least one [tenants.NAME] table")
        out = {}
        taken: dict[str, str] = {}
        for name in t:
            key = f"tenants.{name}"
            if not _NAME.fullmatch(name):
                raise self.fail(key, "name must be lowercase letters, digits and '-'")
            tt = self.table(t, key, {"models", "domains", "isolation"})
            names = self.get(tt, f"{key}.models", list, [])
            if not names:
                raise self.fail(f"{key}.models", "must list at least one model")
            for model in names:
                if not isinstance(model, str):
                    raise self.fail(f"{key}.models", "entries must be model names (strings)")
                if model not in models:
                    raise self.fail(f"{key}.models", f"unknown model {model!r}")
            if len(set(names)) != len(names):
                raise self.fail(f"{key}.models", "lists a model twice")
            isolation = parse_tenant_isolation(self, tt, key)
            out[name] = TenantConfig(name, tuple(names), self.domains(tt, key, names, taken), isolation)
        return out

    def domains(
        self, table: dict[str, Any], key: str, models: list[str], taken: dict[str, str]
    ) -> dict[str, tuple[str, ...]]:
        raw = self.get(table, f"{key}.domains", dict, {})
        out = {}
        for model, devices in raw.items():
            where = f"{key}.domains.{model}"
            if model not in models:
                raise self.fail(where, "not one of this tenant's models")
            uuids = isinstance(devices, list) and all(
                isinstance(d, str) and d.startswith(("GPU-", "MIG-")) for d in devices
            )
            if not devices or not uuids:
                raise self.fail(where, "must list CUDA UUIDs (GPU-… or MIG-…), as `airlock domains` prints")
            if any(d.startswith("MIG-") for d in devices) and len(devices) > 1:
                raise self.fail(where, "a MIG instance is a domain on its own (MIG slices can't be grouped)")
            for device in devices:
                # A domain belongs to one worker, hence one tenant, at a time.
                if device in taken:
                    raise self.fail(where, f"{device} is already the domain of {taken[device]}")
                taken[device] = f"{key}.domains.{model}"
            out[model] = tuple(devices)
        return out
