"""Isolation levels in the deployment configuration: which tenants' models run on a shared worker.

`[tenants.T] isolation = "shared"` places T's models on one shared worker per model (all shared
tenants of that model together); `[shared] domains = { MODEL = ["GPU-…"] }` optionally pins a shared
worker to GPUs. Whether T may really share is the security team's call (policy/tenants.toml): the
gateway serves T from a shared worker only while the policy in service opts T in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.config.parser import Parser
    from gateway.config.schema import Config, TenantConfig

__all__ = [
    "ISOLATION_LEVELS",
    "SHARED",
    "parse_domains",
    "parse_shared_domains",
    "parse_tenant_isolation",
    "shared_models",
]

ISOLATION_LEVELS = ("dedicated", "shared")
# What the launcher, the supervisor's audit trail and metrics call a shared worker's tenant: never a
# tenant's name (a tenant may not be called that while any tenant shares).
SHARED = "shared"


def parse_tenant_isolation(parser: Parser, table: dict[str, Any], key: str) -> str:
    """`[tenants.T] isolation`: "dedicated" (default) or "shared"; a shared tenant has no domains."""
    level = parser.get(table, f"{key}.isolation", str, "dedicated")
    if level not in ISOLATION_LEVELS:
        raise parser.fail(f"{key}.isolation", f'must be "dedicated" or "shared", got {level!r}')
    if level == "shared" and table.get("domains"):
        raise parser.fail(
            f"{key}.domains",
            "a shared tenant has no domain of its own: its models run on the model's shared worker "
            "(place that one with [shared] domains)",
        )
    return level


def parse_shared_domains(
    parser: Parser, raw: dict[str, Any], tenants: dict[str, TenantConfig]
) -> dict[str, tuple[str, ...]]:
    """`[shared] domains`: the GPUs of a model's shared worker, checked like a tenant's domains (a
    device belongs to one worker) and only for models some shared tenant uses."""
    table = parser.table(raw, "shared", {"domains"})
    sharing = {t.name for t in tenants.values() if t.isolation == "shared"}
    if SHARED in tenants and sharing:
        raise parser.fail(f"tenants.{SHARED}", f"the name {SHARED!r} is reserved for shared workers")
    models = sorted({m for t in tenants.values() if t.name in sharing for m in t.models})
    raw_domains = parser.get(table, "shared.domains", dict, {})
    for model in raw_domains:
        if model not in models:
            raise parser.fail(f"shared.domains.{model}", 'no tenant with isolation = "shared" has it')
    taken = {
        device: f"tenants.{t.name}.domains.{model}"
        for t in tenants.values()
        for model, devices in t.domains.items()
        for device in devices
    }
    return parse_domains(parser, table, "shared", models, taken)


def shared_models(config: Config) -> dict[str, tuple[str, ...]]:
    """Model -> the tenants its shared worker serves (sorted), for every model some tenant shares."""
    out: dict[str, list[str]] = {}
    for tenant in config.tenants.values():
        if tenant.isolation == "shared":
            for model in tenant.models:
                out.setdefault(model, []).append(tenant.name)
    return {model: tuple(sorted(names)) for model, names in out.items()}


def parse_domains(
    parser: Parser, table: dict[str, Any], key: str, models: list[str], taken: dict[str, str]
) -> dict[str, tuple[str, ...]]:
    """`domains = { MODEL = ["GPU-…"] }`: the CUDA UUIDs of each model's worker; a device belongs to one
    worker at a time (`taken` names who has it)."""
    raw = parser.get(table, f"{key}.domains", dict, {})
    out = {}
    for model, devices in raw.items():
        where = f"{key}.domains.{model}"
        if model not in models:
            raise parser.fail(where, "not one of this tenant's models")
        uuids = isinstance(devices, list) and all(
            isinstance(d, str) and d.startswith(("GPU-", "MIG-")) for d in devices
        )
        if not devices or not uuids:
            raise parser.fail(where, "must list CUDA UUIDs (GPU-… or MIG-…), as `airlock domains` prints")
        if any(d.startswith("MIG-") for d in devices) and len(devices) > 1:
            raise parser.fail(where, "a MIG instance is a domain on its own (MIG slices can't be grouped)")
        for device in devices:
            # A domain belongs to one worker, hence one tenant, at a time.
            if device in taken:
                raise parser.fail(where, f"{device} is already the domain of {taken[device]}")
            taken[device] = f"{key}.domains.{model}"
        out[model] = tuple(devices)
    return out
