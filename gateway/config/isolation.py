"""Isolation levels in the deployment configuration: which tenants' models run on a shared worker.

`[tenants.T] isolation = "shared"` places T's models on one shared worker per model (all shared
tenants of that model together); `[shared] domains = { MODEL = ["GPU-…"] }` optionally pins a shared
worker to GPUs. Whether T may really share is the security team's call (policy/tenants.toml): the
gateway serves T from a shared worker only while the policy in service opts T in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.config import Config, TenantConfig, _Parser

__all__ = ["ISOLATION_LEVELS", "SHARED", "parse_shared_domains", "parse_tenant_isolation", "shared_models"]

ISOLATION_LEVELS = ("dedicated", "shared")
# What the launcher, the supervisor's audit trail and metrics call a shared worker's tenant: never a
# tenant's name (a tenant may not be called that while any tenant shares).
SHARED = "shared"


def parse_tenant_isolation(parser: _Parser, table: dict[str, Any], key: str) -> str:
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
    parser: _Parser, raw: dict[str, Any], tenants: dict[str, TenantConfig]
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
    return parser.domains(table, "shared", models, taken)


def shared_models(config: Config) -> dict[str, tuple[str, ...]]:
    """Model -> the tenants its shared worker serves (sorted), for every model some tenant shares."""
    out: dict[str, list[str]] = {}
    for tenant in config.tenants.values():
        if tenant.isolation == "shared":
            for model in tenant.models:
                out.setdefault(model, []).append(tenant.name)
    return {model: tuple(sorted(names)) for model, names in out.items()}
