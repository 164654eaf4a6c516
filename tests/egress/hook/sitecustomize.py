"""Egress audit hook for the zero-egress test, loaded by every Python process that has this
directory on PYTHONPATH (Python imports `sitecustomize` at start-up) while AIRLOCK_EGRESS_LOG names
a file. It appends one JSON line per socket connect/send/name lookup, and one when it is installed,
so the test can show that it ran in every process of the stack."""

from __future__ import annotations

import json
import os
import sys

_EVENTS = {
    "socket.connect",
    "socket.sendto",
    "socket.sendmsg",
    "socket.getaddrinfo",
    "socket.gethostbyname",
    "socket.gethostbyaddr",
    "socket.getnameinfo",
}


def _write(path: str, entry: dict[str, object]) -> None:
    line = (json.dumps(entry, default=repr) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _install(path: str) -> None:
    with open("/proc/self/cmdline", "rb") as fh:
        cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    _write(path, {"event": "hook.installed", "pid": os.getpid(), "cmdline": cmdline})

    def hook(event: str, args: tuple[object, ...]) -> None:
        if event not in _EVENTS:
            return
        if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
            sock, address = args[0], args[-1]
            family = getattr(sock, "family", None)
            target: object = address
            entry = {"family": int(family) if family is not None else None}
        else:
            target, entry = args[0], {}
        if isinstance(target, bytes):
            target = target.decode(errors="replace")
        _write(path, {"event": event, "pid": os.getpid(), "target": target, **entry})

    sys.addaudithook(hook)


if os.environ.get("AIRLOCK_EGRESS_LOG"):
    _install(os.environ["AIRLOCK_EGRESS_LOG"])
