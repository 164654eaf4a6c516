"""`airlock lockout list|clear`: a running gateway's lockouts, through its Admin socket.

    airlock lockout list [--socket PATH]                         key, kind, seconds left, failures
    airlock lockout clear (--subject S | --peer P | --key K | --all) [--socket PATH]

The socket is `gateway.admin_socket` of the configuration (default STATE_DIR/run/gateway-admin.sock;
`airlock up` with `--state-dir` puts it there too). Only a user who may open it (the gateway's own)
can use these commands. Exit codes: 0 done, 1 no gateway answered or it refused, 2 bad usage.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc

from airlock.rpcstatus import from_rpc_error
from airlock.v1 import admin_pb2, admin_pb2_grpc
from control.cli.output import err as _err
from gateway import config as config_mod

__all__ = ["cmd_lockout_clear", "cmd_lockout_list"]


def _socket(args: argparse.Namespace) -> Path | None:
    if args.socket is not None:
        return Path(args.socket)
    return config_mod.load(args.config, state_dir=args.state_dir).admin_socket


def _call(args: argparse.Namespace, method: str, request: object) -> object | None:
    """The answer of one Admin call, or None after saying why there is none."""
    path = _socket(args)
    if path is None:
        _err('lockout: the admin socket is disabled (gateway.admin_socket = "")')
        return None
    with grpc.insecure_channel(f"unix:{path.absolute()}") as channel:
        try:
            reply: object = getattr(admin_pb2_grpc.AdminStub(channel), method)(request, timeout=args.timeout)
            return reply
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                _err(f"lockout: no gateway answers on {path} (not running, another state directory, "
                     "or not yours to open)")  # fmt: skip
            else:
                err = from_rpc_error(exc)
                _err(f"lockout: {err.message} [{err.reason}]")
            return None


def cmd_lockout_list(args: argparse.Namespace) -> int:
    reply = _call(args, "ListLockouts", admin_pb2.ListLockoutsRequest())
    if not isinstance(reply, admin_pb2.ListLockoutsResponse):
        return 1
    if not reply.lockouts:
        print("no lockouts and no recent failures")
        return 0
    rows = [(e.key, e.kind, f"{e.seconds_left:.0f}", str(e.failures)) for e in reply.lockouts]
    header = ("KEY", "KIND", "SECONDS LEFT", "FAILURES")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_lockout_clear(args: argparse.Namespace) -> int:
    if args.all:
        request = admin_pb2.ClearLockoutsRequest(all=True)
    elif args.subject is not None:
        request = admin_pb2.ClearLockoutsRequest(subject=args.subject)
    elif args.peer is not None:
        request = admin_pb2.ClearLockoutsRequest(peer=args.peer)
    else:
        request = admin_pb2.ClearLockoutsRequest(key=args.key)
    reply = _call(args, "ClearLockouts", request)
    if not isinstance(reply, admin_pb2.ClearLockoutsResponse):
        return 1
    for key in reply.cleared:
        print(f"cleared {key}")
    if not reply.cleared:
        print("nothing to clear: no lockout or failures matched")
    return 0
