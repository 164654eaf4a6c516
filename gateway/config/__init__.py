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
from pathlib import Path
from typing import Any

from airlock.types import Limits
from gateway.config.http import HttpConfig, parse_http
from gateway.config.isolation import parse_domains, parse_shared_domains, parse_tenant_isolation
from gateway.config.ops import (
    AuditArchiveConfig,
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
    parse_s3,
    parse_sealing,
    parse_supervisor,
    parse_telemetry,
)
from gateway.config.parser import ConfigError, Parser
from gateway.config.schema import (
    ADMIN_SOCKET_NAME,
    ALLOWED_ALGORITHMS,
    ENGINES,
    MAX_GATEWAY_PROCESSES,
    MAX_UNIX_PATH_BYTES,
    NAME,
    AuthConfig,
    Config,
    GatewayConfig,
    IssuerConfig,
    LockoutConfig,
    ModelConfig,
    MtlsConfig,
    TenantConfig,
    TlsConfig,
    TlsFiles,
    default_policy_dir,
    default_state_dir,
)

__all__ = [
    "ADMIN_SOCKET_NAME",
    "MAX_GATEWAY_PROCESSES",
    "MAX_UNIX_PATH_BYTES",
    "NAME",
    "AuditArchiveConfig",
    "AuditConfig",
    "AuthConfig",
    "BundleConfig",
    "Config",
    "ConfigError",
    "FileKeysConfig",
    "GatewayConfig",
    "HttpConfig",
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
    "TlsConfig",
    "TlsFiles",
    "load",
]

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


class _Parser(Parser):
    """The core sections; the operations and isolation sections parse in ops.py and isolation.py."""

    def config(self, raw: dict[str, Any], state_dir: Path | None) -> Config:
        top = {"state_dir", "policy_dir", "gateway", "auth", "lockout", "models", "tenants", "supervisor"}
        top |= {"quota", "telemetry", "audit", "bundles", "keys", "sealing", "shared", "tls", "http", "s3"}
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
        s3, audit = parse_s3(self, raw), parse_audit(self, raw)
        for name, model in models.items():  # the object store they come from must be configured
            if model.path.startswith("s3://") and s3 is None:
                raise self.fail(f"models.{name}.path", "an s3:// model needs an [s3] table (endpoint)")
        if audit.archive.url and s3 is None:
            raise self.fail("audit.archive.url", "the archive needs an [s3] table (endpoint)")
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
            audit=audit,
            bundles=parse_bundles(self, raw),
            keys=parse_keys(self, raw),
            supervisor=parse_supervisor(self, raw),
            sealing=parse_sealing(self, raw),
            tls=self.tls(raw),
            shared_domains=parse_shared_domains(self, raw, tenants),
            http=parse_http(self, raw),
            s3=s3,
        )

    def tls(self, raw: dict[str, Any]) -> TlsConfig:
        t = self.table(raw, "tls", {"cert", "key", "worker_ca", "service_ca", "attestation_ca"})
        tls = TlsConfig(
            **{
                name: self.path(t, f"tls.{name}")
                for name in ("cert", "key", "worker_ca", "service_ca", "attestation_ca")
            }
        )
        if (tls.cert is None) != (tls.key is None):
            raise self.fail(
                "tls.cert" if tls.cert is None else "tls.key", "set tls.cert and tls.key together"
            )
        return tls

    def gateway(self, raw: dict[str, Any]) -> GatewayConfig:
        keys = {
            "listen", "mtls_listen", "metrics_listen", "max_message_bytes", "grace_seconds", "max_tokens",
            "default_max_tokens", "admin_socket", "processes",
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
        processes = self.get(t, "gateway.processes", int, d.processes)
        if not 1 <= processes <= MAX_GATEWAY_PROCESSES:
            raise self.fail("gateway.processes", f"must be between 1 and {MAX_GATEWAY_PROCESSES}")
        return GatewayConfig(
            listen=listen,
            mtls_listen=self.address(t, "gateway.mtls_listen", d.mtls_listen, optional=True),
            metrics_listen=self.address(t, "gateway.metrics_listen", d.metrics_listen, optional=True),
            max_message_bytes=self.positive(t, "gateway.max_message_bytes", d.max_message_bytes),
            grace_seconds=grace,
            limits=Limits(max_tokens=max_tokens, default_max_tokens=default_max),
            admin_socket=self.admin_socket(t),
            processes=processes,
        )

    def admin_socket(self, table: dict[str, Any]) -> str | None:
        if "admin_socket" not in table:
            return None
        value = self.get(table, "gateway.admin_socket", str, "")
        if value and len(os.fsencode(str(Path(value).expanduser().absolute()))) > MAX_UNIX_PATH_BYTES:
            raise self.fail("gateway.admin_socket", f"a Unix socket path is at most {MAX_UNIX_PATH_BYTES} B")
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
        if "ca_file" in m:
            raise self.fail("auth.mtls.ca_file", "moved: the service CA is [tls] service_ca")
        domain = self.get(m, "auth.mtls.trust_domain", str, MtlsConfig().trust_domain)
        if not re.fullmatch(r"[a-z0-9._-]+", domain):
            raise self.fail("auth.mtls.trust_domain", "must be lowercase letters, digits, '.', '-' and '_'")
        return AuthConfig(
            audience=self.get(t, "auth.audience", str, d.audience),
            issuers=issuers or d.issuers,
            leeway_seconds=leeway,
            max_token_bytes=self.positive(t, "auth.max_token_bytes", d.max_token_bytes),
            mtls=MtlsConfig(trust_domain=domain),
            max_token_lifetime_seconds=self.positive(
                t, "auth.max_token_lifetime_seconds", d.max_token_lifetime_seconds
            ),
        )

    def issuer(self, raw: Any, key: str) -> IssuerConfig:
        if not isinstance(raw, dict):
            raise self.fail(key, "must be a table ([[auth.issuers]])")
        allowed = {
            "issuer",
            "jwks_file",
            "algorithms",
            "subject_claim",
            "tenant_claim",
            "tenant_map",
            "tenant",
        }
        for unknown in sorted(set(raw) - allowed):
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
                            algorithms=algorithms, **self.claims(raw, key))  # fmt: skip

    def claims(self, raw: dict[str, Any], key: str) -> dict[str, Any]:
        """Where an issuer's tokens name the subject and the tenant (an identity provider's own
        claims): `subject_claim`, and `tenant`, or `tenant_claim` with an optional `tenant_map`."""
        d = IssuerConfig()
        out: dict[str, Any] = {}
        for name in ("subject_claim", "tenant_claim"):
            value = self.get(raw, f"{key}.{name}", str, getattr(d, name))
            if not 0 < len(value) <= 256 or not value.isprintable():
                raise self.fail(f"{key}.{name}", "must be a claim name or dotted path (1..256 characters)")
            out[name] = value
        fixed = self.get(raw, f"{key}.tenant", str, "")
        if fixed and not NAME.fullmatch(fixed):
            raise self.fail(f"{key}.tenant", "tenant names are lowercase letters, digits and '-'")
        table = self.get(raw, f"{key}.tenant_map", dict, {})
        for value, tenant in table.items():
            if not isinstance(tenant, str) or not NAME.fullmatch(tenant):
                raise self.fail(f"{key}.tenant_map", f"{value!r} must map to a tenant name (lowercase)")
            if not 0 < len(value) <= 256:
                raise self.fail(f"{key}.tenant_map", "claim values are 1..256 characters")
        if fixed and ("tenant_claim" in raw or table):
            raise self.fail(
                f"{key}.tenant", "a fixed tenant reads no claim: drop tenant_claim and tenant_map"
            )
        out.update(tenant=fixed, tenant_map=tuple(sorted(table.items())))
        return out

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
            if not NAME.fullmatch(name):
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
            if path.startswith("s3://"):
                if not re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/[^\s]+", path):
                    raise self.fail(f"{key}.path", "must be s3://BUCKET/PREFIX (a signed bundle)")
            elif engine != "echo" and path != "bundled" and not Path(path).expanduser().is_dir():
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
            if not NAME.fullmatch(name):
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
            out[name] = TenantConfig(
                name, tuple(names), parse_domains(self, tt, key, names, taken), isolation
            )
        return out
