"""The HTTP door's server: Hypercorn serving the ASGI app on the gateway's own event loop.

Why Hypercorn (docs/http.md has the comparison): every bound the door needs is its configuration,
not our code. `keep_alive_timeout` runs from the moment a connection opens or answered its last
request until a complete request head arrives, so it bounds idle keep-alive, silent connections
and slowly trickled headers alike; `ssl_handshake_timeout` bounds handshakes as gRPC's 10 s does;
`h11_max_incomplete_size` bounds the request line and headers (431 beyond); it serves on a running
loop with a shutdown trigger and installs no signal handlers. The body's size and time, the
deadline and the number of open streams are bounded by the app (gateway/http/app.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass
from pathlib import Path

from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig

from gateway.config.http import HttpConfig
from gateway.http.app import HttpDoor

__all__ = ["HttpServer"]

HANDSHAKE_TIMEOUT_S = 10.0  # as the gRPC door's grpc.server_handshake_timeout_ms


@dataclass
class HttpServer:
    """The door, bound (so its port is known before it serves) and not yet serving."""

    app: HttpDoor
    config: HypercornConfig
    port: int
    _stop: asyncio.Event
    _task: asyncio.Task[None] | None = None

    @classmethod
    def bind(
        cls,
        app: HttpDoor,
        http: HttpConfig,
        *,
        cert: Path,
        key: Path,
        grace_seconds: float,
        reuse_port: bool = False,
    ) -> HttpServer:
        host, _, port = http.listen.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:  # the gateway's other processes listen here too (gateway/group.py)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, int(port)))
        except OSError:
            sock.close()
            raise OSError(f"cannot listen on {http.listen}") from None
        bound = sock.getsockname()[1]
        config = HypercornConfig()
        config.bind = [f"fd://{sock.detach()}"]  # the file descriptor is Hypercorn's from here on
        config.certfile, config.keyfile = str(cert), str(key)
        config.alpn_protocols = ["http/1.1"]
        config.keep_alive_timeout = http.keep_alive_seconds
        config.keep_alive_max_requests = (
            1000  # then the connection closes after its answer (clients reconnect)
        )
        config.ssl_handshake_timeout = HANDSHAKE_TIMEOUT_S
        config.h11_max_incomplete_size = http.max_header_bytes
        # HTTP/2 is not offered (ALPN), but a client may still speak it with prior knowledge:
        # bounded alike (a stream per call is the door's concern, max_streams).
        config.h2_max_header_list_size = http.max_header_bytes
        config.h2_max_concurrent_streams = 64
        config.read_timeout = None  # a stream's client is silent while it reads: the deadline bounds it
        config.graceful_timeout = grace_seconds
        config.include_server_header = False
        config.accesslog = None
        config.errorlog = logging.getLogger("airlock.http.server")
        return cls(app, config, bound, asyncio.Event())

    def start(self) -> None:
        self._task = asyncio.ensure_future(serve(self.app, self.config, shutdown_trigger=self._stop.wait))  # type: ignore[arg-type]

    async def stop(self) -> None:
        """Refuse new connections, let calls in flight finish within the grace period, then end."""
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(TimeoutError):  # what is left is cancelled with the loop
                await asyncio.wait_for(self._task, self.config.graceful_timeout + 5)
