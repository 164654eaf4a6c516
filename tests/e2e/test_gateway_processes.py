"""A gateway of two processes (`gateway.processes = 2`, gateway/group.py): real processes on one
port (SO_REUSEPORT), real TLS, echo workers. Connections land on both; operators' admin calls reach
both; a process that dies is started again; stopping the lead stops the other, and a lead killed
outright leaves no process behind."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from airlock import PermissionDeniedError, QuotaExceededError
from airlock.v1 import admin_pb2
from control.cli.status import _print_gateway
from gateway.group import ask
from tests.conftest import ECHO_TOML, NO_LOCKOUT, make_policy_dir
from tests.support import LiveStack

TWO = ECHO_TOML.replace("[gateway]\n", '[gateway]\nprocesses = 2\nmetrics_listen = "127.0.0.1:0"\n')
TWO += NO_LOCKOUT


def requests_served(port: int) -> float:
    """Generation calls one process counted (its own /metrics)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    counts = re.findall(r'^airlock_requests_total\{[^}]*code="OK"[^}]*\} (\S+)$', text, re.M)
    return sum(float(v) for v in counts)


def others(stack: LiveStack) -> list[dict[str, object]]:
    assert stack.stack.gateway is not None
    return list(stack.stack.gateway.info["processes"])


async def status(stack: LiveStack) -> admin_pb2.StatusResponse:
    assert stack.stack.admin_socket is not None
    return await ask(Path(stack.stack.admin_socket), "Status", admin_pb2.StatusRequest())


async def answers_on_fresh_connections(stack: LiveStack, calls: int, tenant: str = "acme") -> list[str]:
    """`calls` calls, each on a connection of its own (the kernel picks a process per connection)."""

    async def one(i: int) -> str:
        async with stack.client(tenant) as client:
            return (await client.generate(f"call {i}", model="echo")).text

    return await asyncio.gather(*(one(i) for i in range(calls)))


async def refused_on_every_process(stack: LiveStack, tenant: str) -> None:
    """20 calls of `tenant`, each on a connection of its own: all refused as not served."""
    refused = await asyncio.gather(
        *(answers_on_fresh_connections(stack, 1, tenant) for _ in range(20)), return_exceptions=True
    )
    assert all(isinstance(r, PermissionDeniedError) and r.reason == "TENANT_NOT_SERVED" for r in refused)


def wait_until(check: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie of ours (not yet reaped) is gone too
    return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")


@pytest.fixture
def two(make_stack: Callable[[str], LiveStack]) -> LiveStack:
    return make_stack(TWO)


async def test_both_processes_serve_one_port_and_report_themselves(
    two: LiveStack, capsys: pytest.CaptureFixture[str]
) -> None:
    [other] = others(two)
    lead_metrics, other_metrics = two.stack.metrics_port, other["metrics_port"]
    assert isinstance(other_metrics, int) and lead_metrics and other_metrics != lead_metrics

    answers = await answers_on_fresh_connections(two, 40)

    assert answers == [f"call {i}" for i in range(40)]
    # 40 connections, each hashed to one of two sockets: both processes took some (1 in 2^39 not)
    lead, rest = requests_served(lead_metrics), requests_served(other_metrics)
    assert lead > 0 and rest > 0 and lead + rest == 40
    text = urllib.request.urlopen(f"http://127.0.0.1:{other_metrics}/metrics", timeout=10).read().decode()
    assert 'airlock_gateway_process{count="2",index="1"} 1.0' in text

    reply = await status(two)
    assert [(p.index, p.serving) for p in reply.processes] == [(0, True), (1, True)]
    assert reply.processes[0].pid == reply.pid and reply.processes[1].pid == other["pid"]
    assert reply.processes[1].metrics_port == other_metrics and reply.processes[1].restarts == 0
    _print_gateway({"address": two.address}, reply)  # `airlock status`
    assert f"2 processes: #0 pid {reply.pid} serving" in capsys.readouterr().out


async def test_route_changes_and_lockout_clears_reach_every_process(two: LiveStack) -> None:
    admin = Path(str(two.stack.admin_socket))
    before = (await status(two)).routes
    keep = [r.route for r in before if r.route.tenant != "globex"]

    await ask(admin, "SetRoutes", admin_pb2.SetRoutesRequest(routes=keep, drain_seconds=1))
    await refused_on_every_process(two, "globex")
    everything = admin_pb2.SetRoutesRequest(routes=[r.route for r in before], ready_seconds=10)
    await ask(admin, "SetRoutes", everything)
    assert await answers_on_fresh_connections(two, 20, "globex") == [f"call {i}" for i in range(20)]

    marker = f"acme/nobody-{time.monotonic_ns()}"
    cleared = await ask(admin, "ClearLockouts", admin_pb2.ClearLockoutsRequest(subject=marker))
    assert list(cleared.cleared) == []
    records = two.audit_records(event="lockout_cleared", value=marker)
    assert len(records) == 2  # each process cleared its own table, and said so


async def test_a_process_that_dies_is_started_again_with_the_routes_in_service(two: LiveStack) -> None:
    [other] = others(two)
    admin = Path(str(two.stack.admin_socket))
    before = (await status(two)).routes
    os.kill(int(str(other["pid"])), signal.SIGKILL)
    # While it is down, a route change can't reach it: the lead says so, and gives it the routes
    # once it is back.
    keep = [r.route for r in before if r.route.tenant != "globex"]
    with pytest.raises(Exception, match="gateway process 1"):
        await ask(admin, "SetRoutes", admin_pb2.SetRoutesRequest(routes=keep, drain_seconds=1))

    deadline = time.monotonic() + 60
    while True:
        reply = await status(two)
        if reply.processes[1].pid not in (0, other["pid"]) and reply.processes[1].serving:
            break
        assert time.monotonic() < deadline, reply.processes
        await asyncio.sleep(0.2)
    assert reply.processes[1].restarts == 1
    assert two.audit_records(event="gateway_process_restarted", process=1)
    # the restarted process took the routes that were set while it was down: globex is refused everywhere
    await refused_on_every_process(two, "globex")
    assert await answers_on_fresh_connections(two, 20) == [f"call {i}" for i in range(20)]


def test_stopping_the_lead_stops_every_process(two: LiveStack) -> None:
    [other] = others(two)
    two.stack.stop(timeout=10)
    wait_until(lambda: gone(int(str(other["pid"]))), 5)


def test_a_lead_killed_outright_leaves_no_process_behind(two: LiveStack) -> None:
    [other] = others(two)
    assert two.stack.gateway is not None
    two.stack.gateway.process.kill()
    wait_until(lambda: gone(int(str(other["pid"]))), 30)
    host, _, port = two.address.rpartition(":")
    with pytest.raises(ConnectionRefusedError):  # nobody listens on the gateway's port any more
        socket.create_connection((host, int(port)), timeout=5).close()


SPLIT_POLICY = """
[tenants.acme]
issuers = ["airlock-dev"]

[tenants.acme.quota]
tokens_per_minute = 100

[tenants.globex]
issuers = ["airlock-dev"]
"""


async def test_each_process_holds_its_share_of_a_tenants_budget(
    make_stack: Callable[[str], LiveStack], tmp_path: Path
) -> None:
    policy = make_policy_dir(tmp_path / "split-policy")
    (policy / "tenants.toml").write_text(SPLIT_POLICY)
    stack = make_stack(f'policy_dir = "{policy}"\n' + TWO)

    async def ask_for(max_tokens: int) -> str | BaseException:
        async with stack.client() as client:
            try:
                return (await client.generate("a b", model="echo", max_tokens=max_tokens)).text
            except QuotaExceededError as exc:
                return exc

    # 100 tokens a minute on the memory store: 50 in each process, on any connection. A call
    # reserves its max_tokens and gives back what it did not use (2 here) as it ends, which may be
    # just after its answer reached us: the next call may find the last one's 10 still held.
    small = [await ask_for(10) for _ in range(10)]
    assert small == ["a b"] * 10
    large = await asyncio.gather(*(ask_for(80) for _ in range(10)))
    assert all(isinstance(r, QuotaExceededError) and r.reason == "TOKEN_QUOTA_EXCEEDED" for r in large)
    assert all("50/min of it in this gateway process" in str(r) for r in large)
