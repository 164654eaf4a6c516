"""`airlock keys create|rotate|list|retire`: manage tenant data keys (never prints key material).

A running gateway picks the change up on its next keystore reload: the store is replaced atomically.
"""

from __future__ import annotations

import argparse
import time

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
    _say("created", _keystore(args).create(args.tenant))
    return 0


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
