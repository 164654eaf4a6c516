"""`airlock keys create|rotate|list|retire`: manage tenant data keys (never prints key material).

A running gateway picks the change up on its next keystore reload: the store is replaced atomically.
"""

from __future__ import annotations

import argparse
import re
import time

from gateway import config as config_mod
from gateway.keys.store import KeyInfo, Keystore, open_keystore

__all__ = ["add_keys_commands"]


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


def _tenant(text: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: lowercase letters, digits and '-'")
    return text


def add_keys_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    keys = sub.add_parser("keys", help="create, rotate, list and retire tenant data keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True)

    create = ksub.add_parser("create", parents=[common], help="make the first key of a tenant")
    create.add_argument("--tenant", required=True, type=_tenant)
    create.set_defaults(func=cmd_keys_create)

    rotate = ksub.add_parser("rotate", parents=[common], help="new active key; old one decrypt-only")
    rotate.add_argument("--tenant", required=True, type=_tenant)
    rotate.set_defaults(func=cmd_keys_rotate)

    retire = ksub.add_parser("retire", parents=[common], help="destroy a decrypt-only key (irreversible)")
    retire.add_argument("--tenant", required=True, type=_tenant)
    retire.add_argument("--key-id", required=True)
    retire.set_defaults(func=cmd_keys_retire)

    listing = ksub.add_parser("list", parents=[common], help="table of keys (never their material)")
    listing.add_argument("--tenant", type=_tenant, help="only this tenant's keys")
    listing.set_defaults(func=cmd_keys_list)
