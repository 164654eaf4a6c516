"""The Admin service on its Unix socket: where the socket may live, what a clear accepts, and that
every clear is audited before it takes effect (a real in-process server on a socket in tmp_path)."""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from airlock.errors import UnavailableError
from airlock.rpcstatus import from_rpc_error
from airlock.v1 import admin_pb2, admin_pb2_grpc
from gateway.admin import AdminService, AdminSocketError, create_admin_server, remove_socket
from gateway.audit import AuditLog
from gateway.auth.lockout import Lockout, peer_key, subject_key
from gateway.config import LockoutConfig


class FailingAudit(AuditLog):
    def record(self, event: str, **fields: Any) -> None:
        raise UnavailableError("audit log unavailable", reason="AUDIT_UNAVAILABLE")


def locked_lockout() -> Lockout:
    lockout = Lockout(LockoutConfig(max_failures=1, max_auth_failures_per_peer=1))
    lockout.failure(subject_key("acme/alice"))
    lockout.failure(peer_key("10.0.0.7"))
    return lockout


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[tuple[admin_pb2_grpc.AdminStub, Lockout, Path]]:
    lockout, audit_path = locked_lockout(), tmp_path / "audit.jsonl"
    path = tmp_path / "run" / "admin.sock"
    server = create_admin_server(path, AdminService(lockout, AuditLog(audit_path)))
    await server.start()
    async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
        yield admin_pb2_grpc.AdminStub(channel), lockout, audit_path
    await server.stop(None)
    remove_socket(path)
    assert not path.exists()


async def test_the_socket_is_made_owner_only_in_an_owner_only_directory(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "admin.sock"
    server = create_admin_server(path, AdminService(Lockout(LockoutConfig()), AuditLog(None)))
    try:
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        assert stat.S_ISSOCK(os.stat(path).st_mode) and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        await server.stop(None)


async def test_list_and_clear(admin: tuple[admin_pb2_grpc.AdminStub, Lockout, Path]) -> None:
    stub, lockout, audit_path = admin
    listed = await stub.ListLockouts(admin_pb2.ListLockoutsRequest(), timeout=5)
    assert {(e.key, e.kind, e.failures) for e in listed.lockouts} == {
        ("subject:acme/alice", "subject", 1),
        ("peer:10.0.0.7", "peer", 1),
    }
    assert all(0 < e.seconds_left <= 300 for e in listed.lockouts)
    cleared = await stub.ClearLockouts(admin_pb2.ClearLockoutsRequest(key="peer:10.0.0.7"), timeout=5)
    assert list(cleared.cleared) == ["peer:10.0.0.7"]
    assert lockout.retry_after(peer_key("10.0.0.7")) is None
    assert lockout.retry_after(subject_key("acme/alice")) is not None
    records = [json.loads(line) for line in audit_path.read_text().splitlines()]
    clears = [r for r in records if r["event"] == "lockout_cleared"]
    assert [(r["target"], r["value"], r["cleared"], r["via"]) for r in clears] == [
        ("key", "peer:10.0.0.7", 1, "admin-socket")
    ]


@pytest.mark.parametrize(
    "request_",
    [
        admin_pb2.ClearLockoutsRequest(),
        admin_pb2.ClearLockoutsRequest(all=False),
        admin_pb2.ClearLockoutsRequest(subject=""),
        admin_pb2.ClearLockoutsRequest(subject="acme/alice\n"),
        admin_pb2.ClearLockoutsRequest(peer="\x1b[2J"),
        admin_pb2.ClearLockoutsRequest(key="k" * 513),
    ],
)
async def test_a_clear_that_names_nothing_valid_is_refused(
    admin: tuple[admin_pb2_grpc.AdminStub, Lockout, Path], request_: admin_pb2.ClearLockoutsRequest
) -> None:
    stub, lockout, audit_path = admin
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ClearLockouts(request_, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert from_rpc_error(err.value).reason == "INVALID_ARGUMENT"
    assert len(lockout.entries()) == 2
    assert "lockout_cleared" not in (audit_path.read_text() if audit_path.exists() else "")


async def test_nothing_is_cleared_when_the_clear_cannot_be_audited(tmp_path: Path) -> None:
    lockout, path = locked_lockout(), tmp_path / "run" / "admin.sock"
    server = create_admin_server(path, AdminService(lockout, FailingAudit(None)))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await admin_pb2_grpc.AdminStub(channel).ClearLockouts(
                    admin_pb2.ClearLockoutsRequest(all=True), timeout=5
                )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert len(lockout.entries()) == 2
    finally:
        await server.stop(None)


def test_a_directory_others_may_enter_is_refused_not_changed(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    with pytest.raises(AdminSocketError, match="chmod 700"):
        create_admin_server(shared / "admin.sock", AdminService(Lockout(LockoutConfig()), AuditLog(None)))
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o755
    assert not (shared / "admin.sock").exists()


def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(AdminSocketError, match="not a directory"):
        create_admin_server(
            tmp_path / "link" / "admin.sock", AdminService(Lockout(LockoutConfig()), AuditLog(None))
        )


def test_a_file_in_the_way_is_refused_and_kept(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    (run / "admin.sock").write_text("not mine to delete")
    with pytest.raises(AdminSocketError, match="not a socket"):
        create_admin_server(run / "admin.sock", AdminService(Lockout(LockoutConfig()), AuditLog(None)))
    assert (run / "admin.sock").read_text() == "not mine to delete"


async def test_a_stale_socket_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    path = run / "admin.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(1)
    try:
        with pytest.raises(AdminSocketError, match="another process"):
            create_admin_server(path, AdminService(Lockout(LockoutConfig()), AuditLog(None)))
    finally:
        live.close()  # the file stays behind, as after a crash
    assert path.exists()
    server = create_admin_server(path, AdminService(Lockout(LockoutConfig()), AuditLog(None)))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
            reply = await admin_pb2_grpc.AdminStub(channel).ListLockouts(
                admin_pb2.ListLockoutsRequest(), timeout=5
            )
        assert list(reply.lockouts) == []
    finally:
        await server.stop(None)


def test_a_path_too_long_for_a_unix_socket_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AdminSocketError, match="shorter path"):
        create_admin_server(
            tmp_path / ("d" * 120) / "admin.sock", AdminService(Lockout(LockoutConfig()), AuditLog(None))
        )
