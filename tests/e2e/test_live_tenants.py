"""Tenants without downtime: a third tenant is added to a running stack and served while the first
two keep streaming, then removed (drained, worker stopped, domain scrubbed), with no error for anyone
else. The operator's way: `airlock up` on a configuration file, `airlock tenant add|remove --write`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from airlock import AirlockError, AuthenticationError, PermissionDeniedError
from control.runfile import process_alive
from tests.e2e.cli_stack import CliStack

WORDS = " ".join(f"w{i}" for i in range(40))  # 40 tokens at 100/s: 0.4 s a stream


@pytest.fixture
def operator(tmp_path: Path) -> Iterator[CliStack]:
    stack = CliStack(tmp_path)
    stack.up()
    yield stack
    stack.stop()


async def keep_streaming(stack: CliStack, tenant: str, stop: asyncio.Event, done: list[str]) -> None:
    """Stream, one call after another, until `stop`; every answer must be whole."""
    async with stack.client(tenant, retries=0) as client:
        while not stop.is_set():
            text = "".join([c.text async for c in client.stream(WORDS, model="echo", max_tokens=60)])
            assert text == WORDS, text
            done.append(tenant)


async def served(stack: CliStack, tenant: str, limit: float = 90) -> str:
    end = time.monotonic() + limit
    while True:
        try:
            async with stack.client(tenant, retries=0) as client:
                return (await client.generate("hello initech", model="echo", timeout=10)).text
        except AirlockError:
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.2)


async def test_a_tenant_added_and_removed_while_two_others_keep_streaming(operator: CliStack) -> None:
    stop, done = asyncio.Event(), []
    streams = [asyncio.create_task(keep_streaming(operator, t, stop, done)) for t in ("acme", "globex")]
    await asyncio.sleep(1)
    before_add = len(done)

    added = await asyncio.to_thread(
        operator.run, "tenant", "add", "initech", "--model", "echo", "--user", "tester", "--write"
    )
    assert added.returncode == 0, added.stdout + added.stderr
    assert await served(operator, "initech") == "hello initech"
    operator.wait_printed("tenant initech: starting worker-initech-echo")
    info = operator.info()
    assert info is not None
    worker = next(w for w in info["workers"] if w["tenants"] == ["initech"])
    assert process_alive(worker["pid"])

    removed = await asyncio.to_thread(operator.run, "tenant", "remove", "initech", "--write")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert "waiting for the running stack to drain and stop tenant initech" in removed.stdout
    assert not process_alive(worker["pid"])  # stopped before the policy forgot the tenant
    # Its routes are gone at once (TENANT_NOT_SERVED); the gateway forgets the tenant itself when it
    # reloads the rewritten config a moment later (TOKEN_TENANT_UNKNOWN). Never is it served again.
    reasons = []
    for _ in range(100):
        with pytest.raises((AuthenticationError, PermissionDeniedError)) as refused:
            async with operator.client("initech", retries=0) as client:
                await client.generate("still here?", model="echo")
        assert "tenant 'initech' is not served here" in refused.value.message
        reasons.append(refused.value.reason)
        if refused.value.reason == "TOKEN_TENANT_UNKNOWN":
            break
        await asyncio.sleep(0.1)
    assert set(reasons) <= {"TENANT_NOT_SERVED", "TOKEN_TENANT_UNKNOWN"}
    assert reasons[-1] == "TOKEN_TENANT_UNKNOWN"

    await asyncio.sleep(1)
    stop.set()
    await asyncio.gather(*streams)  # an error in any stream of acme or globex fails the test here
    assert len(done) > before_add + 4 and {"acme", "globex"} <= set(done[before_add:])

    supervisor = [r for r in operator.records("supervisor.jsonl") if r.get("tenant") == "initech"]
    events = [(r["event"], r.get("phase")) for r in supervisor]
    assert ("domain_scrub", "start") in events and ("domain_scrub", "remove") in events
    scrub = next(r for r in supervisor if r.get("phase") == "remove")
    assert scrub["verified"] is True and scrub["canary_hits"] == 0
    assert any(r["event"] == "worker_removed" and r["scrub_verified"] for r in supervisor)
    routes = [r for r in operator.records() if r["event"] == "routes_set"]
    assert [(r["added"], r["removed"]) for r in routes] == [(["initech/echo"], []), ([], ["initech/echo"])]
    printed = operator.wait_printed("tenant initech: worker-initech-echo stopped; domain scrub verified")
    assert "REJECTED" not in printed  # the policy changed only once the tenant was gone
    info = operator.info()
    assert info is not None and [w["tenants"] for w in info["workers"]] == [["acme"], ["globex"]]


async def test_a_tenant_the_policy_lacks_runs_unrouted_until_the_policy_lists_it(operator: CliStack) -> None:
    text = operator.config.read_text() + '\n[tenants.initech]\nmodels = ["echo"]\n'
    operator.config.write_text(text)
    operator.wait_printed("not routed yet: initech")
    with pytest.raises(AuthenticationError):
        async with operator.client("initech", retries=0) as client:
            await client.generate("x", model="echo")
    with (operator.policy / "tenants.toml").open("a") as fh:
        fh.write('\n[tenants.initech]\nissuers = ["airlock-dev"]\n')
    with (operator.policy / "policy.csv").open("a") as fh:
        fh.write("g, initech/tester, user, initech\n")
    assert await served(operator, "initech") == "hello initech"


def test_the_admin_socket_refuses_routes_it_can_not_serve(operator: CliStack) -> None:
    import grpc

    from airlock.rpcstatus import from_rpc_error
    from airlock.v1 import admin_pb2, admin_pb2_grpc

    info = operator.info()
    assert info is not None
    route = admin_pb2.Route(tenant="acme", model="echo", engine="echo", address="127.0.0.1:1")
    cases = [
        (admin_pb2.Route(tenant="ACME", model="echo", engine="echo", address="127.0.0.1:1"), "ROUTE_INVALID"),
        (admin_pb2.Route(tenant="acme", model="echo", engine="echo", address="nowhere"), "ROUTE_INVALID"),
        (
            admin_pb2.Route(tenant="initech", model="echo", engine="echo", address="127.0.0.1:1"),
            "ROUTE_REFUSED",
        ),
    ]
    with grpc.insecure_channel(f"unix:{info['admin_socket']}") as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        for bad, reason in [*cases, (route, "ROUTE_INVALID")]:
            routes = [bad, route] if bad is route else [bad]
            with pytest.raises(grpc.RpcError) as failed:
                stub.SetRoutes(admin_pb2.SetRoutesRequest(routes=routes), timeout=10)
            assert from_rpc_error(failed.value).reason == reason  # type: ignore[arg-type]
        status = stub.Status(admin_pb2.StatusRequest(), timeout=10)
    assert sorted(r.route.tenant for r in status.routes) == ["acme", "globex"]  # nothing changed
    assert all(r["event"] != "routes_set" for r in operator.records())
