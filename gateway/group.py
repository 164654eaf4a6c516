"""A gateway of several processes (`gateway.processes = N`): one event loop per core, one set of ports.

Process 0, the lead, is what `python -m gateway` starts and what the launcher, `airlock status` and
Prometheus's first target see. It binds the gateway's ports with SO_REUSEPORT (the kernel spreads
connections over every socket of the same user on a port), then starts processes 1..N-1 as its
children with `--process I/N`, on the ports it bound (so `:0` works), each with a metrics port of
its own (the configured port + I; any free one when that is 0) and an admin socket of its own
(`NAME-pI.sock` beside the lead's), and writes its ready file only once all of them serve.

Each process keeps its own lockout table and token cache, policy and JWKS watches, key releases,
worker channels and metrics. They share the ports, the audit trail (one chained file, its writers
serialised by its lock file: gateway/audit.py) and the quotas: through the Redis store, or, on the
memory store, each process holds its `Share` of every tenant's budget (gateway/quota.py). Only the
lead ships the trail to the audit archive.

The lead restarts a process that exits (after 1 s, doubling to 30 s while it keeps failing) and
gives it the routes in service once it is ready; forwards operators' admin calls to every process
(gateway/admin.py); and stops them all with itself. A process whose lead is gone drains and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from airlock.errors import UnavailableError
from airlock.v1 import admin_pb2, admin_pb2_grpc
from gateway.live import route_proto
from gateway.quota import Share
from gateway.routing import Route
from serving.rpc import OWN_CONNECTION

__all__ = [
    "LEAD", "Group", "GroupError", "Place", "admin_socket_of", "merge_lockouts",
    "metrics_listen_of", "parse_place", "watch_lead",
]  # fmt: skip

_log = logging.getLogger("airlock.gateway.group")

READY_TIMEOUT_S = 120.0  # a process that doesn't serve by then fails the gateway's start
ADMIN_TIMEOUT_S = 10.0  # one admin call forwarded to one process
FIRST_BACKOFF_S, MAX_BACKOFF_S = 1.0, 30.0


class GroupError(Exception):
    """A process of the gateway did not start; the message says which and why."""


@dataclass(frozen=True)
class Place:
    """This process among the gateway's: `index` of `count` (0 is the lead)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"process {self.index} of {self.count}")

    @property
    def lead(self) -> bool:
        return self.index == 0

    @property
    def share(self) -> Share:
        return Share(self.index, self.count)


LEAD = Place()


def parse_place(text: str) -> Place:
    """`I/N` as `--process` gives it."""
    index, sep, count = text.partition("/")
    try:
        if not sep:
            raise ValueError(text)
        return Place(int(index), int(count))
    except ValueError:
        raise ValueError(f"--process must be I/N with 0 <= I < N, got {text!r}") from None


def admin_socket_of(lead_socket: Path, index: int) -> Path:
    """Process `index`'s admin socket, beside the lead's."""
    return lead_socket.with_name(f"{lead_socket.stem}-p{index}{lead_socket.suffix}")


def metrics_listen_of(lead_listen: str, index: int) -> str:
    """Process `index`'s metrics address: the lead's port + index (any free port when that is 0)."""
    if not lead_listen:
        return ""
    host, _, port = lead_listen.rpartition(":")
    return f"{host}:{int(port) + index if int(port) else 0}"


async def ask(socket_path: Path, method: str, request: Message, timeout: float = ADMIN_TIMEOUT_S) -> Any:
    """One call to a process's admin service, on a connection of its own: gRPC's shared subchannel
    for the path would still be backing off from a refusal of the process that was there before a
    restart, and would refuse the new one's socket without trying it."""
    async with grpc.aio.insecure_channel(f"unix:{socket_path}", options=[OWN_CONNECTION]) as channel:
        return await getattr(admin_pb2_grpc.AdminStub(channel), method)(request, timeout=timeout)


async def watch_lead(lead_pid: int, stopping: asyncio.Event, every: float = 1.0) -> None:
    """In processes 1..N-1: drain and exit when the lead is gone (this process was re-parented)."""
    while not stopping.is_set():
        if os.getppid() != lead_pid:
            _log.error("the gateway's process 0 is gone; this process drains and exits")
            stopping.set()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), every)


@dataclass
class _Member:
    index: int
    ready_file: Path
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    restarts: int = 0
    info: dict[str, Any] | None = None  # its ready file, once it serves

    @property
    def admin_socket(self) -> Path | None:
        path = (self.info or {}).get("admin_socket")
        return Path(path) if path else None


class Group:
    """The lead's view of processes 1..N-1: start, watch and restart, ask, stop."""

    def __init__(
        self,
        count: int,
        argv: Callable[[int, Path, list[Route]], list[str]],
        routes: Callable[[], list[Route]],
        *,
        on_restart: Callable[[int, int | None], None] = lambda index, returncode: None,
        ready_timeout: float = READY_TIMEOUT_S,
    ) -> None:
        self._argv = argv  # (index, ready file, routes) -> the process's arguments after the interpreter
        self._routes = routes  # the routes in service now
        self._on_restart = on_restart
        self._ready_timeout = ready_timeout
        self._dir = Path(tempfile.mkdtemp(prefix="airlock-gateway-"))  # 0700: the ready files
        self.members = [_Member(i, self._dir / f"ready-{i}.json") for i in range(1, count)]
        self._stopping = False
        self._watchers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Start every process and wait until all serve; on any failure stop those started and raise."""
        try:
            await asyncio.gather(*(self._start(m) for m in self.members))
        except BaseException:
            await self.stop(0.0)
            raise
        self._watchers = [asyncio.create_task(self._watch(m)) for m in self.members]

    async def _start(self, member: _Member) -> None:
        member.ready_file.unlink(missing_ok=True)
        member.info = None
        argv = self._argv(member.index, member.ready_file, self._routes())
        member.process = await asyncio.create_subprocess_exec(sys.executable, *argv)
        member.started = time.monotonic()
        deadline = member.started + self._ready_timeout
        while not member.ready_file.exists():
            if member.process.returncode is not None:
                raise GroupError(
                    f"gateway process {member.index} exited ({member.process.returncode}) before it served; "
                    "its log lines are the gateway's"
                )
            if time.monotonic() > deadline:
                member.process.kill()
                raise GroupError(
                    f"gateway process {member.index} did not serve within {self._ready_timeout:.0f} s"
                )
            await asyncio.sleep(0.05)
        member.info = json.loads(member.ready_file.read_text())

    async def _watch(self, member: _Member) -> None:
        """Start the process again whenever it exits, until the group stops; survives anything."""
        backoff = FIRST_BACKOFF_S
        while True:
            assert member.process is not None
            returncode = await member.process.wait()
            if self._stopping:
                return
            member.info = None
            _log.error("gateway process exited; starting it again in %.0f s", backoff,
                       extra={"gateway_process": member.index, "returncode": returncode})  # fmt: skip
            try:
                self._on_restart(member.index, returncode)
            except Exception:  # the audit trail down, say: the process still comes back
                _log.exception("could not record a gateway process restart")
            await asyncio.sleep(backoff)
            if self._stopping:
                return
            member.restarts += 1
            try:
                await self._start(member)
                await self._sync_routes(member)
            except Exception as exc:
                _log.error("gateway process did not start again: %.500s", exc,
                           extra={"gateway_process": member.index})  # fmt: skip
                if member.process is not None and member.process.returncode is None:
                    member.process.kill()  # never left serving routes that are no longer in service
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            backoff = FIRST_BACKOFF_S

    async def _sync_routes(self, member: _Member) -> None:
        """Give a restarted process the routes in service (they may have changed while it started);
        raises if it did not take them."""
        if member.admin_socket is None:
            return
        request = admin_pb2.SetRoutesRequest(routes=[route_proto(r) for r in self._routes()])
        await ask(member.admin_socket, "SetRoutes", request)

    async def each(self, method: str, request: Message, timeout: float = ADMIN_TIMEOUT_S) -> list[Any]:
        """`method` on every other process's admin service; UnavailableError naming any that failed
        (one not running now included)."""

        async def one(member: _Member) -> Any:
            if member.admin_socket is None:
                raise UnavailableError(f"gateway process {member.index} is not running (being restarted)")
            try:
                return await ask(member.admin_socket, method, request, timeout)
            except grpc.aio.AioRpcError as exc:
                raise UnavailableError(f"gateway process {member.index}: {exc.details()}") from None

        results = await asyncio.gather(*(one(m) for m in self.members), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise UnavailableError("; ".join(str(f) for f in failed))
        return results

    async def statuses(self) -> list[admin_pb2.GatewayProcess]:
        """Processes 1..N-1 as the lead sees them and as each reports itself."""

        async def one(member: _Member) -> admin_pb2.GatewayProcess:
            entry = admin_pb2.GatewayProcess(index=member.index, restarts=member.restarts)
            if member.admin_socket is None or member.process is None or member.process.returncode is not None:
                return entry
            entry.pid, entry.uptime_seconds = member.process.pid, time.monotonic() - member.started
            with contextlib.suppress(grpc.aio.AioRpcError):
                status = await ask(member.admin_socket, "Status", admin_pb2.StatusRequest())
                entry.serving, entry.metrics_port = status.serving, status.metrics_port
            return entry

        return list(await asyncio.gather(*(one(m) for m in self.members)))

    def describe(self) -> list[dict[str, Any]]:
        """For the lead's ready file: each process's pid, metrics port and admin socket."""
        return [
            {"index": m.index, "pid": m.process.pid if m.process else None, **{
                k: (m.info or {}).get(k) for k in ("metrics_port", "admin_socket")}}
            for m in self.members
        ]  # fmt: skip

    async def stop(self, grace_seconds: float) -> None:
        """SIGTERM to every process (each drains for its grace period), then SIGKILL to stragglers."""
        self._stopping = True
        running = [m.process for m in self.members if m.process is not None and m.process.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        if running:
            _done, pending = await asyncio.wait([asyncio.create_task(p.wait()) for p in running],
                                               timeout=grace_seconds + 5)  # fmt: skip
            for process in running:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            for task in pending:
                await task
        for watcher in self._watchers:
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        shutil.rmtree(self._dir, ignore_errors=True)


def merge_lockouts(tables: Sequence[admin_pb2.ListLockoutsResponse]) -> admin_pb2.ListLockoutsResponse:
    """Every process's lockout table as one: a key's failures summed, its longest lockout kept,
    locked keys first (longest remaining first)."""
    merged: dict[str, admin_pb2.Lockout] = {}
    for table in tables:
        for entry in table.lockouts:
            seen = merged.get(entry.key)
            if seen is None:
                merged[entry.key] = seen = admin_pb2.Lockout()
                seen.CopyFrom(entry)
            else:
                seen.seconds_left = max(seen.seconds_left, entry.seconds_left)
                seen.failures += entry.failures
    ordered = sorted(merged.values(), key=lambda e: (-(e.seconds_left > 0), -e.seconds_left, e.key))
    return admin_pb2.ListLockoutsResponse(lockouts=ordered)
