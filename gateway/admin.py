"""The gateway's `Admin` service for operators, served on a Unix domain socket and nowhere else.

Whoever can connect to the socket is an operator of this gateway: filesystem permissions are its
authentication. The socket lives in a directory owned by the gateway's user with mode 0700 (made so
when missing; a directory that is someone else's, a symlink or open to others stops start-up rather
than being changed) and is itself mode 0600. A live socket at the path (another gateway) stops
start-up; a stale one is replaced. Its clients: `airlock lockout list|clear` (control/cli/lockout.py),
`airlock status`, and the launcher, which sets the gateway's routes as tenants come and go.

Every clear and every route change is audited before it takes effect: if the audit trail can't be
written, nothing changes. Status and routes are the running gateway's (gateway/live.py).

In a gateway of several processes (gateway/group.py) each has an admin socket; the lead's forwards
route changes and lockout clears to every process (each audits its own), merges their lockout
tables and lists them all in its status. A forwarded call that fails says which process it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from airlock.errors import InvalidRequestError, UnavailableError
from airlock.v1 import admin_pb2, admin_pb2_grpc
from gateway.audit import AuditLog
from gateway.auth.lockout import Lockout, peer_key, subject_key
from gateway.config import MAX_UNIX_PATH_BYTES
from gateway.group import ADMIN_TIMEOUT_S, merge_lockouts
from serving.logs import current_request_id
from serving.rpc import ErrorInterceptor

if TYPE_CHECKING:
    from gateway.group import Group
    from gateway.live import LiveGateway

__all__ = ["MAX_TARGET_CHARS", "AdminService", "AdminSocketError", "create_admin_server", "remove_socket"]

MAX_TARGET_CHARS = 512  # a key, subject or peer to clear: longer than any the gateway makes


class AdminSocketError(Exception):
    """The admin socket can't be served safely at its path; the message says why and what to do."""


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(
        self, lockout: Lockout, audit: AuditLog, live: LiveGateway | None = None, *, index: int = 0,
        group: Group | None = None,
    ) -> None:  # fmt: skip
        self.lockout = lockout
        self.audit = audit
        self.live = live  # None: a lockout-only service (tests); Status and SetRoutes are unavailable
        self.index = index  # this process's among the gateway's
        self.group = group  # the lead's other processes, which it forwards to; None: none

    def _live(self) -> LiveGateway:
        if self.live is None:
            raise UnavailableError("this admin service has no gateway to report on")
        return self.live

    async def Status(
        self, request: admin_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.StatusResponse:
        status = self._live().status()
        status.processes.append(admin_pb2.GatewayProcess(
            index=self.index, pid=status.pid, uptime_seconds=status.uptime_seconds, serving=status.serving,
            metrics_port=status.metrics_port,
        ))  # fmt: skip
        if self.group is not None:
            status.processes.extend(await self.group.statuses())
        return status

    async def SetRoutes(
        self, request: admin_pb2.SetRoutesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.SetRoutesResponse:
        response = await self._live().set_routes(request)  # checks the request: a bad one goes no further
        if self.group is not None:
            await self.group.each("SetRoutes", request, ADMIN_TIMEOUT_S + request.ready_seconds)
        return response

    async def ListLockouts(
        self, request: admin_pb2.ListLockoutsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListLockoutsResponse:
        mine = admin_pb2.ListLockoutsResponse(
            lockouts=[
                admin_pb2.Lockout(key=e.key, kind=e.kind, seconds_left=e.seconds_left, failures=e.failures)
                for e in self.lockout.entries()
            ]
        )
        if self.group is None:
            return mine
        return merge_lockouts([mine, *await self.group.each("ListLockouts", request)])

    async def ClearLockouts(
        self, request: admin_pb2.ClearLockoutsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ClearLockoutsResponse:
        target, value, match = _target(request)
        keys = self.lockout.matching(match)
        self.audit.record(
            "lockout_cleared", target=target, value=value, cleared=len(keys), via="admin-socket",
            request_id=current_request_id(),
        )  # fmt: skip
        self.lockout.clear(keys)
        if self.group is not None:
            others = await self.group.each("ClearLockouts", request)
            keys = sorted({*keys, *(key for other in others for key in other.cleared)})
        return admin_pb2.ClearLockoutsResponse(cleared=keys)


def _target(request: admin_pb2.ClearLockoutsRequest) -> tuple[str, str | None, Callable[[str], bool]]:
    """What a clear names: (which field, its value, the keys it matches)."""
    which = request.WhichOneof("target")
    if which == "all":
        if not request.all:
            raise InvalidRequestError("all must be true", field="all")
        return which, None, lambda _key: True
    if which not in ("key", "subject", "peer"):
        raise InvalidRequestError("name what to clear: key, subject, peer or all", field="target")
    value: str = getattr(request, which)
    if not 0 < len(value) <= MAX_TARGET_CHARS or not value.isprintable():
        raise InvalidRequestError(f"{which} must be 1..{MAX_TARGET_CHARS} printable characters", field=which)
    wanted = {"key": value, "subject": subject_key(value), "peer": peer_key(value)}[which]
    return which, value, lambda key: key == wanted


def create_admin_server(path: Path, service: AdminService) -> grpc.aio.Server:
    """The admin server bound to `path` (not started); its directory checked or made first."""
    if len(os.fsencode(str(path))) > MAX_UNIX_PATH_BYTES:
        raise AdminSocketError(
            f"admin socket path {path} is longer than {MAX_UNIX_PATH_BYTES} bytes; set "
            'gateway.admin_socket to a shorter path, or "" to disable it'
        )
    _private_directory(path.parent)
    _clear_stale(path)
    server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=[("grpc.so_reuseport", 0)])
    admin_pb2_grpc.add_AdminServicer_to_server(service, server)
    if server.add_insecure_port(f"unix:{path}") == 0:
        raise AdminSocketError(f"cannot listen on the admin socket {path}")
    os.chmod(path, 0o600)  # the directory already keeps others out; this says so on the socket too
    return server


def remove_socket(path: Path) -> None:
    """Remove the socket the gateway served (at shutdown); leave anything else alone."""
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            path.unlink()


def _private_directory(directory: Path) -> None:
    if not directory.exists() and not directory.is_symlink():
        directory.mkdir(mode=0o700, parents=True)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise AdminSocketError(f"{directory} (the admin socket's directory) is not a directory")
    if info.st_uid != os.geteuid():
        raise AdminSocketError(
            f"{directory} (the admin socket's directory) belongs to uid {info.st_uid}, not to the gateway's"
        )
    if info.st_mode & 0o077:
        raise AdminSocketError(
            f"{directory} (the admin socket's directory) has mode {stat.S_IMODE(info.st_mode):04o}; "
            f"its filesystem permissions are the socket's only protection: chmod 700 {directory}"
        )


def _clear_stale(path: Path) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise AdminSocketError(f"{path} exists and is not a socket; remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise AdminSocketError(f"cannot check the admin socket {path}: {exc.strerror}") from None
        path.unlink(missing_ok=True)  # left by a gateway that did not stop cleanly
        return
    finally:
        probe.close()
    raise AdminSocketError(f"another process serves the admin socket {path} (another gateway?)")
