"""Checks `airlock up` makes before it starts anything: every port it will bind is free.

A port in use is found here, in a second, naming the configuration key that chose it, instead of
after the workers loaded their models and the gateway exited with a gRPC bind error in its log.
"""

from __future__ import annotations

import errno
import socket

__all__ = ["PortError", "check_ports"]


class PortError(Exception):
    """A port the stack would bind is not available; the message names the key and what to do."""


def check_ports(ports: list[tuple[str, str]]) -> None:
    """Bind each (config key or flag, HOST:PORT) for a moment; port 0 and "" (disabled) are skipped."""
    for key, address in ports:
        if not address:
            continue
        host, _, port_text = address.rpartition(":")
        port = int(port_text)
        if port == 0:
            continue
        host = host.strip("[]")
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise PortError(f"{key} = {address!r}: cannot resolve {host!r} ({exc.strerror})") from None
        family, kind, proto, _, sockaddr = infos[0]
        with socket.socket(family, kind, proto) as probe:
            # As servers bind: a connection in TIME_WAIT does not make a port in use.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                raise PortError(f"{key} = {address!r}: {_why(exc, key)}") from None


def _why(exc: OSError, key: str) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (
            "the port is in use (another `airlock up`? `airlock status` shows the stack of a state "
            f"directory): stop it, or choose another port ({key})"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return "not an address of this host"
    if exc.errno == errno.EACCES:
        return "binding it needs privileges (a port below 1024?)"
    return f"cannot bind it ({exc.strerror})"
