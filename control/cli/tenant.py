"""`airlock tenant add|remove|list`: the tenant set, edited in the files that define it.

add and remove print the diff of every file they change (the configuration and the security team's
policy files) and write nothing without --write; a running `airlock up` then starts or stops the
tenant without touching the others. list shows where each tenant is known.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from control.cli.output import err, table
from control.runfile import NoRunningStackError, find_running
from control.tenants import Edit, TenantEditError, add_tenant, remove_tenant
from gateway import config as config_mod
from gateway.keys import open_keystore

__all__ = ["cmd_tenant_add", "cmd_tenant_list", "cmd_tenant_remove"]


def _context(args: argparse.Namespace) -> tuple[config_mod.Config, Path]:
    cfg = config_mod.load(args.config, state_dir=args.state_dir)
    return cfg, Path(args.policy_dir) if args.policy_dir else cfg.policy_dir


def _show(
    edits: list[Edit], write: bool, verb: str, name: str, *, between: Callable[[], None] = lambda: None
) -> int:
    for edit in edits:
        print(edit.diff(), end="")
    if not write:
        print(f"\nnothing written: these are the edits that {verb} tenant {name}; run again with --write")
        return 0
    for i, edit in enumerate(edits):  # the policy first when adding, the configuration first when removing
        edit.apply()
        print(f"wrote {edit.path}", flush=True)
        if i == 0:
            between()
    print(f"tenant {name} {verb.rstrip('e')}ed in the files; a running `airlock up` follows them "
          "(its output says what it did; `airlock status`)")  # fmt: skip
    return 0


def cmd_tenant_add(args: argparse.Namespace) -> int:
    cfg, policy_dir = _context(args)
    issuers = (
        args.issuer
        or [i.issuer for i in cfg.auth.issuers if i.jwks_file is None]
        or [cfg.auth.issuers[0].issuer]
    )
    quota = {
        "requests_per_second": args.requests_per_second,
        "tokens_per_minute": args.tokens_per_minute,
        "concurrent_streams": args.concurrent_streams,
    }
    try:
        edits = add_tenant(cfg, policy_dir, args.name, models=args.model, issuers=issuers, users=args.user,
                           admins=args.admin, quota=quota)  # fmt: skip
    except TenantEditError as exc:
        err(f"tenant add: {exc}")
        return 2
    code = _show(edits, args.write, "add", args.name)
    if not args.user and not args.admin:
        print(f"note: no subject of {args.name} has a role yet; grant some in {policy_dir / 'policy.csv'} "
              f"(--user NAME, --admin NAME), e.g. `g, {args.name}/alice, user, {args.name}`")  # fmt: skip
    return code


def cmd_tenant_remove(args: argparse.Namespace) -> int:
    cfg, policy_dir = _context(args)
    try:
        edits = remove_tenant(cfg, policy_dir, args.name)
    except TenantEditError as exc:
        err(f"tenant remove: {exc}")
        return 2
    removing_config = bool(edits) and edits[0].path == Path(cfg.source)
    code = _show(edits, args.write, "remove", args.name,
                 between=lambda: _await_stopped(cfg, args.name) if removing_config else None)  # fmt: skip
    print(f"note: tenant {args.name}'s keys stay in the keystore (`airlock keys list --tenant {args.name}`; "
          "retire them once nothing sealed under them remains)")  # fmt: skip
    return code


def _await_stopped(cfg: config_mod.Config, name: str, timeout: float = 120.0) -> None:
    """Once the configuration no longer has the tenant, a running stack drains and stops it; the
    policy changes after that (a policy without a tenant still routed would be refused)."""
    try:
        find_running(cfg.state_dir)
    except NoRunningStackError:
        return
    print(f"waiting for the running stack to drain and stop tenant {name}…", flush=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            running = find_running(cfg.state_dir)
        except NoRunningStackError:
            return
        if not any(name in w.get("tenants", []) for w in running.info.get("workers", [])):
            return
        time.sleep(0.2)
    err(f"tenant remove: the running stack still serves {name} after {timeout:.0f} s; editing the policy now")


def cmd_tenant_list(args: argparse.Namespace) -> int:
    cfg, policy_dir = _context(args)
    from control.cli.keys import _policy_tenants

    policy = _policy_tenants(policy_dir / "tenants.toml")
    keys: dict[str, str] = {}
    for info in open_keystore(cfg.keys, cfg.state_dir).list():
        if info.state == "active":
            keys[info.tenant] = info.key_id
    try:
        running = find_running(cfg.state_dir)
        served = {t for w in running.info.get("workers", []) for t in w.get("tenants", [])}
    except NoRunningStackError:
        served = None
    rows = []
    for name in sorted(set(cfg.tenants) | policy | set(keys)):
        tenant = cfg.tenants.get(name)
        rows.append((
            name,
            ", ".join(tenant.models) if tenant else "-",
            tenant.isolation if tenant else "-",
            "yes" if name in policy else "NO",
            keys.get(name, "none"),
            "-" if served is None else ("yes" if name in served else "no"),
        ))  # fmt: skip
    table(("TENANT", "MODELS (config)", "ISOLATION", "IN POLICY", "ACTIVE KEY", "RUNNING"), rows)
    if served is None:
        print(f"(no running stack in {cfg.state_dir})")
    return 0
