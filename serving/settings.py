"""A worker's settings: one frozen object, defined once, that the launcher writes and the worker reads.

    python -m worker --settings run/worker-acme-smollm2.settings.json

`control.launcher` builds one `WorkerSettings` per worker from the configuration and writes it as
JSON (`write`: mode 0600, atomically); `worker.main` loads it (`WorkerSettings.load`); deploy/k8s
gives each worker pod its file from a ConfigMap. The dataclasses below are the schema: their
defaults are the only ones, a field left out of a file takes its default, an unknown field is an
error. Every object checks itself when it is made, so a file that loads is one the worker can run,
and a failure names the file and the field:

    settings file run/w.settings.json: field tenants[1].attest_key: required

Relative paths are read from the worker's working directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

from airlock.attestation import SUITES
from airlock.types import MODEL_NAME, Limits

__all__ = [
    "ENGINES",
    "ISOLATIONS",
    "SCRUB_MODES",
    "BundleTrust",
    "DomainSettings",
    "RequestLimits",
    "S3Settings",
    "SettingsError",
    "TenantIdentity",
    "TlsFiles",
    "WorkerSettings",
]

ENGINES = ("transformers", "echo", "vllm")
ISOLATIONS = ("dedicated", "shared")  # shared: one engine serves several opted-in tenants
SCRUB_MODES = ("request", "tenant-switch", "off")  # when a request's state is zeroed (see DomainSettings)

NAME = MODEL_NAME  # tenant and model names: lower-case letters, digits and dashes
_DEVICE = re.compile(r"cpu|cuda(:[0-9]{1,3})?")
_T = TypeVar("_T")


class SettingsError(ValueError):
    """A settings file (or object) that the worker must not run with; names the file and the field."""

    def __init__(self, field: str, reason: str, source: str = "") -> None:
        where = f"field {field}: " if field else ""
        super().__init__(f"settings file {source}: {where}{reason}" if source else f"{where}{reason}")
        self.field, self.reason, self.source = field, reason, source

    def within(self, prefix: str) -> SettingsError:
        """The same error, its field named from an enclosing object (`domain` + `scrub`)."""
        return SettingsError(_join(prefix, self.field), self.reason, self.source)

    def located(self, source: str) -> SettingsError:
        return SettingsError(self.field, self.reason, source)


@dataclass(frozen=True)
class TenantIdentity:
    """A tenant the worker serves, and the attestation certificate and key it signs evidence with
    for that tenant (`spiffe://TD/tenant/NAME/worker`, from the attestation CA)."""

    name: str
    attest_cert: Path
    attest_key: Path

    def __post_init__(self) -> None:
        if not NAME.fullmatch(self.name):
            raise SettingsError("name", "must be lower-case letters, digits and dashes (at most 63)")


@dataclass(frozen=True)
class TlsFiles:
    """The worker's server certificate, and the CA its one allowed client (the gateway) chains to."""

    cert: Path
    key: Path
    client_ca: Path
    allowed_peer: str = "airlock-gateway"  # the client certificate's common name

    def __post_init__(self) -> None:
        if not self.allowed_peer:
            raise SettingsError("allowed_peer", "must not be empty")


@dataclass(frozen=True)
class BundleTrust:
    """Which keys a model bundle must be signed by, and whether an unsigned one may load at all."""

    trusted_keys: Path | None = None  # PEM public keys (Ed25519); None: no signed model loads
    require_signed: bool = True  # False: load unsigned models, with a warning
    signing_key: Path | None = None  # development only: signs the bundled model when it is converted


@dataclass(frozen=True)
class S3Settings:
    """An S3-compatible object store (Ceph RGW on site; serving/s3.py): where it is and how to
    reach it. The keys are never here: they are read from `credentials_file` (mode 0600) or from
    the environment variables named (docs/storage.md)."""

    endpoint: str  # http(s)://HOST:PORT
    region: str = "default"
    ca_file: Path | None = None  # CA bundle of an https endpoint (None: the system's)
    credentials_file: Path | None = None  # `access_key_id = …` and `secret_access_key = …` lines
    access_key_env: str = "AWS_ACCESS_KEY_ID"  # used when there is no credentials_file
    secret_key_env: str = "AWS_SECRET_ACCESS_KEY"
    parallel: int = 8  # ranged GETs in flight while a bundle streams
    part_bytes: int = 8 << 20  # bytes per ranged GET
    timeout_seconds: float = 30.0  # connect and read timeout of one request

    def __post_init__(self) -> None:
        if not re.fullmatch(r"https?://[^/\s]+/?", self.endpoint):
            raise SettingsError("endpoint", "must be http(s)://HOST[:PORT]")
        for name in ("access_key_env", "secret_key_env"):
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", getattr(self, name)):
                raise SettingsError(name, "must be an environment variable name (the key stays out)")
        _at_least(self, 1, "parallel", "part_bytes")
        if not self.timeout_seconds > 0:
            raise SettingsError("timeout_seconds", "must be positive")


@dataclass(frozen=True)
class DomainSettings:
    """The isolation domain the worker runs in, and how its memory is kept apart."""

    device: str = "cpu"  # "cpu" or "cuda" (the GPUs the launcher pinned, CUDA_VISIBLE_DEVICES)
    arena: Path | None = None  # the CPU domain's memory arena (/dev/shm): request state and canaries
    arena_bytes: int = 16 << 20
    canary_file: Path | None = None  # where the canaries' hashes go, for the scrub after exit
    scrub: str = "request"  # one of SCRUB_MODES
    tensor_parallel_size: int = 1  # vllm: the GPUs of the domain

    def __post_init__(self) -> None:
        _choice(self, "scrub", SCRUB_MODES)
        if not _DEVICE.fullmatch(self.device):
            raise SettingsError("device", 'must be "cpu", "cuda" or "cuda:N"')
        _at_least(self, 1, "arena_bytes", "tensor_parallel_size")


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for and carry."""

    max_tokens: int = Limits.max_tokens
    default_max_tokens: int = Limits.default_max_tokens  # when a request names none
    max_message_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        _at_least(self, 1, "max_tokens", "default_max_tokens", "max_message_bytes")
        if self.default_max_tokens > self.max_tokens:
            raise SettingsError("default_max_tokens", "must not exceed max_tokens")

    def limits(self) -> Limits:
        return Limits(max_tokens=self.max_tokens, default_max_tokens=self.default_max_tokens)


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker process is started with, apart from where it reports readiness and how
    much it logs (flags of the process: `--ready-file`, `--log-level`)."""

    tenants: tuple[TenantIdentity, ...]  # a dedicated worker's one tenant; a shared worker's every one
    model: str  # the name callers use
    tls: TlsFiles
    cache_dir: Path  # where converted models are kept
    engine: str = "transformers"  # one of ENGINES
    model_path: str = "bundled"  # "bundled", a local model directory or s3://BUCKET/PREFIX (a signed bundle)
    listen: str = "127.0.0.1:0"
    isolation: str = "dedicated"  # one of ISOLATIONS
    domain: DomainSettings = field(default_factory=DomainSettings)
    bundles: BundleTrust = field(default_factory=BundleTrust)
    limits: RequestLimits = field(default_factory=RequestLimits)
    hpke_suite: str = SUITES[0]  # how tenant and end-to-end keys are sealed to this worker
    threads: int = 0  # transformers: CPU threads (0: torch's default)
    echo_tokens_per_second: float = 0.0  # echo: pacing (0: as fast as it can)
    max_model_len: int | None = None  # vllm: context per sequence (None: the model's)
    # True: callers' text may spell the chat template's control tokens (the model's opt-out).
    allow_special_tokens: bool = False
    grace_seconds: float = 10.0  # how long in-flight calls may finish after SIGTERM
    s3: S3Settings | None = None  # the object store an s3:// model_path is streamed from

    def __post_init__(self) -> None:
        if not self.tenants:
            raise SettingsError("tenants", "must name at least one tenant")
        seen: set[str] = set()
        for i, tenant in enumerate(self.tenants):
            if tenant.name in seen:
                raise SettingsError(f"tenants[{i}].name", f"tenant {tenant.name!r} is named twice")
            seen.add(tenant.name)
        if not NAME.fullmatch(self.model):
            raise SettingsError("model", "must be lower-case letters, digits and dashes (at most 63)")
        _choice(self, "engine", ENGINES)
        _choice(self, "isolation", ISOLATIONS)
        _choice(self, "hpke_suite", SUITES)
        if not self.model_path:
            raise SettingsError("model_path", 'must be "bundled" or a model directory')
        if self.model_path.startswith("s3://") and self.s3 is None:
            raise SettingsError("s3", "an s3:// model_path needs the object store's settings")
        host, _, port = self.listen.rpartition(":")
        if not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
            raise SettingsError("listen", "must be HOST:PORT (port 0: any free port)")
        if len(self.tenants) > 1 and self.isolation != "shared":
            raise SettingsError("isolation", 'serving several tenants needs isolation "shared"')
        if self.isolation == "shared" and self.domain.scrub == "off":
            # Fail closed: state must never pass from one tenant's request to another's unzeroed.
            raise SettingsError("domain.scrub", 'a shared worker zeroes state between tenants: "request" '
                                'or "tenant-switch"')  # fmt: skip
        _at_least(self, 0, "threads", "echo_tokens_per_second", "grace_seconds")
        if self.max_model_len is not None:
            _at_least(self, 1, "max_model_len")

    @property
    def tenant(self) -> str:
        """The first tenant: a dedicated worker's only one."""
        return self.tenants[0].name

    @property
    def tenant_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tenants)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data, every field included (a written file says everything the worker runs with)."""
        return typing.cast(dict[str, Any], _encode(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def write(self, path: Path) -> None:
        """Write the settings to `path`: owner-only (mode 0600) and atomically (a worker that starts
        meanwhile reads the old file or the new one, never half of one)."""
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:  # mkstemp makes it 0600
                fh.write(self.to_json())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def from_json(cls, text: str, source: str = "<settings>") -> WorkerSettings:
        try:
            raw = json.loads(text, object_pairs_hook=_no_duplicates)
        except json.JSONDecodeError as exc:
            reason = f"not JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
            raise SettingsError("", reason, source) from None
        except SettingsError as exc:
            raise exc.located(source) from None
        try:
            return _build(cls, raw, "")
        except SettingsError as exc:
            raise exc.located(source) from None

    @classmethod
    def load(cls, path: Path) -> WorkerSettings:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
            raise SettingsError("", f"cannot be read: {reason}", str(path)) from None
        return cls.from_json(text, str(path))


def _join(prefix: str, name: str) -> str:
    if not prefix:
        return name
    return f"{prefix}{name}" if name.startswith("[") else f"{prefix}.{name}" if name else prefix


def _choice(obj: object, name: str, choices: tuple[str, ...]) -> None:
    if getattr(obj, name) not in choices:
        raise SettingsError(name, f"must be one of {', '.join(choices)}")


def _at_least(obj: object, least: int, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < least:
            raise SettingsError(name, "must be positive" if least == 1 else f"must be at least {least}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise SettingsError(key, "given twice")
        out[key] = value
    return out


def _encode(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _build(cls: type[_T], raw: object, where: str) -> _T:
    """Make a settings dataclass from JSON data, checking every field's type on the way."""
    if not isinstance(raw, dict):
        raise SettingsError(where, "must be an object")
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for unknown in sorted(set(raw) - set(known)):
        raise SettingsError(_join(where, unknown), "unknown field")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in known.items():
        if name in raw:
            values[name] = _decode(hints[name], raw[name], _join(where, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SettingsError(_join(where, name), "required")
    try:
        return cls(**values)
    except SettingsError as exc:
        raise exc.within(where) from None


def _decode(kind: Any, value: object, where: str) -> object:
    origin = get_origin(kind)
    if origin is types.UnionType or origin is typing.Union:  # X | None
        if value is None:
            return None
        [inner] = [a for a in get_args(kind) if a is not type(None)]
        return _decode(inner, value, where)
    if kind is str:
        if not isinstance(value, str):
            raise SettingsError(where, "must be a string")
        return value
    if origin is tuple:  # tuple[X, ...]
        if not isinstance(value, list):
            raise SettingsError(where, "must be a list")
        return tuple(_decode(get_args(kind)[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        return _build(kind, value, where)
    if kind is Path:
        if not isinstance(value, str) or not value:
            raise SettingsError(where, "must be a path (a non-empty string)")
        return Path(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise SettingsError(where, "must be true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(where, "must be an integer")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise SettingsError(where, "must be a number")
        return float(value)
    raise TypeError(f"no settings decoder for {kind!r} ({where})")  # a field type this module lacks
