"""`airlock keys create|rotate|list|retire`: manage tenant data keys (never prints key material).

A running gateway picks the change up on its next keystore reload: the store is replaced atomically.
"""

from __future__ import annotations

import argparse
import time
import tomllib
from pathlib import Path

from control.cli.output import err
from gateway import config as config_mod
from gateway.keys import open_keystore
from gateway.keys.store import KeyInfo, Keystore

__all__ = ["cmd_keys_create", "cmd_keys_list", "cmd_keys_retire", "cmd_keys_rotate"]


def _keystore(args: argparse.Namespace) -> Keystore:
    cfg = config_mod.load(args.config, state_dir=args.state_dir)
    return open_keystore(cfg.keys, cfg.state_dir)


def _say(verb: str, info: KeyInfo) -> None:
    print(f"{verb} key {info.key_id} of tenant {info.tenant}: now {info.state} ({info.backend} backend)")


def cmd_keys_create(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config, state_dir=args.state_dir)
    listed = cfg.policy_dir / "tenants.toml"
    if args.tenant not in cfg.tenants and args.tenant not in _policy_tenants(listed):
        err(f"keys create: tenant {args.tenant!r} is in neither the configuration ({cfg.source}) nor the "
            f"policy ({listed}): add it first (`airlock tenant add {args.tenant} --model M`)")  # fmt: skip
        return 2
    _say("created", open_keystore(cfg.keys, cfg.state_dir).create(args.tenant))
    return 0


def _policy_tenants(path: Path) -> set[str]:
    """The tenant names of a policy's tenants.toml (read as TOML only: no policy engine)."""
    try:
        tenants = tomllib.loads(path.read_text(encoding="utf-8")).get("tenants", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return set()
    return set(tenants) if isinstance(tenants, dict) else set()


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    keystore = _keystore(args)
    old = [i.key_id for i in keystore.list(args.tenant) if i.state == "active"]
    _say("rotated to", keystore.rotate(args.tenant))
    for key_id in old:
        print(f"previous key {key_id}: now decrypt-only (retire it once nothing sealed under it remains)")
    return 0


def cmd_keys_retire(args: argparse.Namespace) -> int:
    _say("retired", _keystore(args).retire(args.tenant, args.key_id))
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    infos = _keystore(args).list(args.tenant)
    rows = [("TENANT", "KEY ID", "STATE", "CREATED (UTC)", "BACKEND")]
    for i in infos:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(i.created))
        rows.append((i.tenant, i.key_id, i.state, created, i.backend))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if not infos:
        print("(no keys)")
    return 0
