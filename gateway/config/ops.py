"""The operations sections of the configuration file: audit, bundles, quota, telemetry, keys,
supervisor and sealing; their frozen dataclasses and parsers (gateway/config/__init__.py reads the file)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.settings import S3Settings, SettingsError

if TYPE_CHECKING:
    from gateway.config.parser import Parser

__all__ = [
    "FSYNC_POLICIES",
    "AuditArchiveConfig",
    "AuditConfig",
    "BundleConfig",
    "FileKeysConfig",
    "KeysConfig",
    "Pkcs11KeysConfig",
    "QuotaConfig",
    "SealingConfig",
    "SupervisorConfig",
    "TelemetryConfig",
    "parse_audit",
    "parse_bundles",
    "parse_keys",
    "parse_quota",
    "parse_s3",
    "parse_sealing",
    "parse_supervisor",
    "parse_telemetry",
]

FSYNC_POLICIES = ("always", "interval", "never")


@dataclass(frozen=True)
class AuditArchiveConfig:
    """The audit trail's WORM copy (gateway/archive.py, docs/storage.md); off while `url` is ""."""

    url: str = ""  # s3://BUCKET/PREFIX ({host}: this host's name); the bucket gets Object Lock
    retention_days: int = 365  # COMPLIANCE retention of every archived object
    seal_key: Path | None = None  # AES-256 key file: segments sealed under it (None: stored as they are)
    poll_seconds: float = 5.0  # how often it looks without being woken (and the first retry delay)
    max_backlog_segments: int = 4  # more closed segments waiting: health says NOT_SERVING


@dataclass(frozen=True)
class AuditConfig:
    """The hash-chained audit trail (gateway/audit.py): where, how durably, how often signed."""

    path: Path | None = None  # None: state_dir/audit/gateway.jsonl
    fsync: str = "interval"  # always | interval | never
    fsync_interval_seconds: float = 1.0
    rotate_bytes: int = 64 << 20  # 0: never rotate
    sign_every_records: int = 1000  # 0: not by count
    sign_every_seconds: float = 60.0  # 0: not by time
    signing_key: Path | None = None  # None: the dev key, state_dir/pki/audit-signing.key
    archive: AuditArchiveConfig = field(default_factory=AuditArchiveConfig)


@dataclass(frozen=True)
class BundleConfig:
    """Signed model bundles (serving/bundle.py): whom to trust, and whether a signature is required."""

    trusted_keys: Path | None = None  # None: the dev trusted keys, state_dir/pki/bundle-trusted.pem
    require_signed: bool = True


@dataclass(frozen=True)
class QuotaConfig:
    """Where per-tenant quota state lives (the limits themselves are policy: policy/tenants.toml)."""

    backend: str = "memory"  # "memory" (one replica) or "redis" (shared by every replica)
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "airlock:quota"
    lease_seconds: float = 600.0  # a concurrency slot a dead replica left behind frees after this


@dataclass(frozen=True)
class TelemetryConfig:
    """OpenTelemetry traces (the `otel` extra), off by default; spans go to a local OTLP collector."""

    traces: bool = False
    otlp_endpoint: str = "127.0.0.1:4317"
    service_name: str = "airlock-gateway"


@dataclass(frozen=True)
class FileKeysConfig:
    master_key: Path | None = None  # None: state_dir/keys/master.key (made on first use)


@dataclass(frozen=True)
class Pkcs11KeysConfig:
    """A PKCS#11 token; the user PIN comes from a 0600 file or an environment variable, never from here."""

    module: Path | None = None  # None: SoftHSM2 in the usual Debian paths
    token_label: str = ""
    pin_file: Path | None = None
    pin_env: str = ""


@dataclass(frozen=True)
class KeysConfig:
    """The tenant keystore (docs/keys.md): "file" (a master key file) or "pkcs11" (an HSM token)."""

    backend: str = "file"
    store: Path | None = None  # None: state_dir/keys/keystore.json
    file: FileKeysConfig = field(default_factory=FileKeysConfig)
    pkcs11: Pkcs11KeysConfig = field(default_factory=Pkcs11KeysConfig)


@dataclass(frozen=True)
class SupervisorConfig:
    """Worker supervision: restarts with backoff, domain scrubbing, its own metrics endpoint."""

    restart: bool = True  # restart a crashed worker (after its domain's scrub verified)
    backoff_seconds: float = 0.5  # first restart delay; doubles per consecutive crash
    backoff_max_seconds: float = 30.0
    health_interval_seconds: float = 2.0
    metrics_listen: str = ""  # Prometheus /metrics of the supervisor; "" disables
    scrub: str = "request"  # request state zeroing: "request", "tenant-switch" or "off"
    arena_mb: int = 16  # the CPU domain's arena per worker


@dataclass(frozen=True)
class SealingConfig:
    """Attestation-gated key release (docs/sealing.md)."""

    hpke_suite: str = "mlkem768-x25519"  # how keys are sealed to workers: or "x25519"
    reattest_seconds: float = 600.0  # a worker is attested again at least this often


def parse_keys(p: Parser, raw: dict[str, Any]) -> KeysConfig:
    t = p.table(raw, "keys", {"backend", "store", "file", "pkcs11"})
    backend = p.get(t, "keys.backend", str, "file")
    if backend not in ("file", "pkcs11"):
        raise p.fail("keys.backend", f'must be "file" or "pkcs11", got {backend!r}')
    f = p.table(t, "keys.file", {"master_key"})
    hsm = p.table(t, "keys.pkcs11", {"module", "token_label", "pin_file", "pin_env", "pin"})
    if "pin" in hsm:
        raise p.fail("keys.pkcs11.pin", "never the PIN itself: use pin_file or pin_env")
    pkcs11 = Pkcs11KeysConfig(
        module=_keys_path(p, hsm, "keys.pkcs11.module"),
        token_label=p.get(hsm, "keys.pkcs11.token_label", str, ""),
        pin_file=_keys_path(p, hsm, "keys.pkcs11.pin_file"),
        pin_env=p.get(hsm, "keys.pkcs11.pin_env", str, ""),
    )
    if pkcs11.pin_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", pkcs11.pin_env):
        raise p.fail("keys.pkcs11.pin_env", "must be an environment variable name (the PIN stays out)")
    if backend == "pkcs11":
        if not pkcs11.token_label:
            raise p.fail("keys.pkcs11.token_label", 'is required with backend = "pkcs11"')
        if (pkcs11.pin_file is None) == (not pkcs11.pin_env):
            raise p.fail("keys.pkcs11", "set exactly one of pin_file and pin_env (never the PIN)")
    master = _keys_path(p, f, "keys.file.master_key")
    return KeysConfig(backend, _keys_path(p, t, "keys.store"), FileKeysConfig(master), pkcs11)


def _keys_path(p: Parser, table: dict[str, Any], key: str) -> Path | None:
    value = p.get(table, key, str, "")
    return Path(value).expanduser().absolute() if value else None


def parse_quota(p: Parser, raw: dict[str, Any]) -> QuotaConfig:
    t = p.table(raw, "quota", {"backend", "redis_url", "key_prefix", "lease_seconds"})
    d = QuotaConfig()
    backend = p.get(t, "quota.backend", str, d.backend)
    if backend not in ("memory", "redis"):
        raise p.fail("quota.backend", f'must be "memory" or "redis", got {backend!r}')
    url = p.get(t, "quota.redis_url", str, d.redis_url)
    if not re.match(r"(redis|rediss|unix)://", url):
        raise p.fail("quota.redis_url", "must be a redis://, rediss:// or unix:// URL")
    prefix = p.get(t, "quota.key_prefix", str, d.key_prefix)
    if not prefix:
        raise p.fail("quota.key_prefix", "must not be empty")
    lease = p.get(t, "quota.lease_seconds", float, d.lease_seconds)
    if lease <= 0:
        raise p.fail("quota.lease_seconds", "must be > 0")
    return QuotaConfig(backend, url, prefix, lease)


def parse_telemetry(p: Parser, raw: dict[str, Any]) -> TelemetryConfig:
    t = p.table(raw, "telemetry", {"traces", "otlp_endpoint", "service_name"})
    d = TelemetryConfig()
    return TelemetryConfig(
        traces=p.get(t, "telemetry.traces", bool, d.traces),
        otlp_endpoint=p.address(t, "telemetry.otlp_endpoint", d.otlp_endpoint, optional=False),
        service_name=p.get(t, "telemetry.service_name", str, d.service_name),
    )


def parse_audit(p: Parser, raw: dict[str, Any]) -> AuditConfig:
    keys = {
        "path", "fsync", "fsync_interval_seconds", "rotate_bytes", "sign_every_records",
        "sign_every_seconds", "signing_key", "archive",
    }  # fmt: skip
    t = p.table(raw, "audit", keys)
    d = AuditConfig()
    fsync = p.get(t, "audit.fsync", str, d.fsync)
    if fsync not in FSYNC_POLICIES:
        raise p.fail("audit.fsync", f"must be one of {', '.join(FSYNC_POLICIES)}")
    numbers: dict[str, float] = {}
    for name, kind, default in (
        ("fsync_interval_seconds", float, d.fsync_interval_seconds),
        ("rotate_bytes", int, d.rotate_bytes),
        ("sign_every_records", int, d.sign_every_records),
        ("sign_every_seconds", float, d.sign_every_seconds),
    ):
        numbers[name] = p.get(t, f"audit.{name}", kind, default)
        if numbers[name] < 0:
            raise p.fail(f"audit.{name}", "must be >= 0")
    path, key = p.get(t, "audit.path", str, ""), p.get(t, "audit.signing_key", str, "")
    return AuditConfig(
        path=Path(path).expanduser().absolute() if path else None,
        fsync=fsync,
        fsync_interval_seconds=float(numbers["fsync_interval_seconds"]),
        rotate_bytes=int(numbers["rotate_bytes"]),
        sign_every_records=int(numbers["sign_every_records"]),
        sign_every_seconds=float(numbers["sign_every_seconds"]),
        signing_key=Path(key).expanduser().absolute() if key else None,
        archive=_parse_archive(p, t),
    )


def _parse_archive(p: Parser, audit: dict[str, Any]) -> AuditArchiveConfig:
    t = p.table(audit, "audit.archive", {"url", "retention_days", "seal_key", "poll_seconds",
                                         "max_backlog_segments"})  # fmt: skip
    d = AuditArchiveConfig()
    url = p.get(t, "audit.archive.url", str, d.url)
    if url and not re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?", url):
        raise p.fail("audit.archive.url", "must be s3://BUCKET/PREFIX")
    days = p.positive(t, "audit.archive.retention_days", d.retention_days)
    if days > 36500:
        raise p.fail("audit.archive.retention_days", "must be at most 36500 (100 years)")
    poll = p.get(t, "audit.archive.poll_seconds", float, d.poll_seconds)
    if not 0 < poll <= 3600:
        raise p.fail("audit.archive.poll_seconds", "must be in (0, 3600]")
    backlog = p.get(t, "audit.archive.max_backlog_segments", int, d.max_backlog_segments)
    if backlog < 0:
        raise p.fail("audit.archive.max_backlog_segments", "must be >= 0")
    return AuditArchiveConfig(url, days, p.path(t, "audit.archive.seal_key"), poll, backlog)


def parse_s3(p: Parser, raw: dict[str, Any]) -> S3Settings | None:
    """The object store (`[s3]`); None when the file has no [s3] table. Never the keys themselves."""
    if "s3" not in raw:
        return None
    keys = {"endpoint", "region", "ca_file", "credentials_file", "access_key_env", "secret_key_env",
            "parallel", "part_bytes", "timeout_seconds"}  # fmt: skip
    secrets = {"access_key", "access_key_id", "secret_key", "secret_access_key", "aws_secret_access_key"}
    t = raw["s3"] if isinstance(raw["s3"], dict) else {}
    for name in sorted(secrets & set(t)):
        raise p.fail(f"s3.{name}", "never the key itself: use credentials_file or the environment")
    t = p.table(raw, "s3", keys)
    endpoint = p.get(t, "s3.endpoint", str, "")
    if not endpoint:
        raise p.fail("s3.endpoint", "is required (http(s)://HOST:PORT of the store)")
    values: dict[str, Any] = {"endpoint": endpoint}
    for name in ("region", "access_key_env", "secret_key_env"):
        if name in t:
            values[name] = p.get(t, f"s3.{name}", str, "")
    for name in ("parallel", "part_bytes"):
        if name in t:
            values[name] = p.positive(t, f"s3.{name}", 1)
    if "timeout_seconds" in t:
        values["timeout_seconds"] = p.get(t, "s3.timeout_seconds", float, 30.0)
    values["ca_file"] = p.path(t, "s3.ca_file")
    values["credentials_file"] = p.path(t, "s3.credentials_file")
    try:
        return S3Settings(**values)
    except SettingsError as exc:
        raise p.fail(f"s3.{exc.field}", exc.reason) from None


def parse_bundles(p: Parser, raw: dict[str, Any]) -> BundleConfig:
    t = p.table(raw, "bundles", {"trusted_keys", "require_signed"})
    keys = p.get(t, "bundles.trusted_keys", str, "")
    return BundleConfig(
        trusted_keys=Path(keys).expanduser().absolute() if keys else None,
        require_signed=p.get(t, "bundles.require_signed", bool, BundleConfig.require_signed),
    )


def parse_sealing(p: Parser, raw: dict[str, Any]) -> SealingConfig:
    t = p.table(raw, "sealing", {"hpke_suite", "reattest_seconds", "attestation_ca"})
    d = SealingConfig()
    suite = p.get(t, "sealing.hpke_suite", str, d.hpke_suite)
    if suite not in ("mlkem768-x25519", "x25519"):
        raise p.fail("sealing.hpke_suite", 'must be "mlkem768-x25519" or "x25519"')
    seconds = p.get(t, "sealing.reattest_seconds", float, d.reattest_seconds)
    if not 0 < seconds <= 86400:
        raise p.fail("sealing.reattest_seconds", "must be in (0, 86400]")
    if "attestation_ca" in t:
        raise p.fail("sealing.attestation_ca", "moved: the attestation CA is [tls] attestation_ca")
    return SealingConfig(suite, seconds)


def parse_supervisor(p: Parser, raw: dict[str, Any]) -> SupervisorConfig:
    keys = {"restart", "backoff_seconds", "backoff_max_seconds", "health_interval_seconds",
            "metrics_listen", "scrub", "arena_mb"}  # fmt: skip
    t = p.table(raw, "supervisor", keys)
    d = SupervisorConfig()
    values: dict[str, Any] = {}
    for key in ("backoff_seconds", "backoff_max_seconds", "health_interval_seconds"):
        values[key] = p.get(t, f"supervisor.{key}", float, getattr(d, key))
        if values[key] <= 0:
            raise p.fail(f"supervisor.{key}", "must be > 0")
    scrub = p.get(t, "supervisor.scrub", str, d.scrub)
    if scrub not in ("request", "tenant-switch", "off"):
        raise p.fail("supervisor.scrub", "must be one of request, tenant-switch, off")
    return SupervisorConfig(
        restart=p.get(t, "supervisor.restart", bool, d.restart),
        metrics_listen=p.address(t, "supervisor.metrics_listen", d.metrics_listen, optional=True),
        scrub=scrub,
        arena_mb=p.positive(t, "supervisor.arena_mb", d.arena_mb),
        **values,
    )
