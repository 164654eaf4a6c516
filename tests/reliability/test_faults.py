"""Faults under concurrent mixed load from both tenants, each followed by its recovery check.

tests/e2e covers most of these faults one at a time on an idle stack; here the stack is busy when
the fault hits, so each test also proves the fault stays contained (no other call fails, or only
with the one clean status the fault should cause) and what recovery looks like.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from airlock import PermissionDeniedError, UnavailableError
from control.audit_verify import load_public_key, verify_log
from control.tokens import mint_dev_token
from gateway.audit import AuditLog, load_signing_key
from tests.conftest import make_policy_dir
from tests.reliability.load import Load, wait_until, without_quotas
from tests.support import LiveStack

WORDS = " ".join(f"w{i}" for i in range(40))  # 2 s at the slow model's 20 tokens/s
DRAIN_WORDS = " ".join(f"d{i}" for i in range(100))  # 5 s: well inside the grace period
GRACE_SECONDS = 10

STACK = f"""
[gateway]
metrics_listen = "127.0.0.1:0"
max_tokens = 512
default_max_tokens = 64
grace_seconds = {GRACE_SECONDS}

[models.echo]
engine = "echo"

[models.slow]
engine = "echo"
tokens_per_second = 20

[tenants.acme]
models = ["echo", "slow"]

[tenants.globex]
models = ["echo", "slow"]

[supervisor]
backoff_seconds = 0.2
health_interval_seconds = 1
metrics_listen = "127.0.0.1:0"
arena_mb = 4
"""


def unmetered(tmp_path: Path, extra: str = "") -> str:
    """STACK on the repository's policy without quotas (tests/reliability/load.py says why)."""
    return f'policy_dir = "{without_quotas(tmp_path / "policy")}"\n' + STACK + extra


def scrape(port: int | None) -> str:
    assert port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def supervisor_events(live: LiveStack, domain: str) -> list[dict[str, Any]]:
    path = live.config.state_dir / "audit" / "supervisor.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("domain") == domain]


def gateway_log(live: LiveStack) -> str:
    assert live.stack.gateway is not None
    return live.stack.gateway.log.read_text()


def replace(path: Path, data: bytes) -> None:
    """Write the way deploy tools do: a new file beside the watched directory, renamed in."""
    tmp = path.parent.parent / f"{path.name}.{uuid.uuid4().hex}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def test_worker_killed_mid_stream(make_stack: Callable[[str], LiveStack], tmp_path: Path) -> None:
    live = make_stack(unmetered(tmp_path))
    key = ("acme", "slow")
    victim, domain = live.stack.workers[key], live.stack.domains[key]
    async with Load(live) as load, live.client("acme") as acme, live.client("globex") as globex:
        await asyncio.sleep(1.0)
        theirs = globex.stream(WORDS, model="slow", max_tokens=40)
        mine = acme.stream(WORDS, model="slow", max_tokens=40)
        first = await theirs.__anext__()
        await mine.__anext__()
        os.kill(victim.process.pid, signal.SIGKILL)
        with pytest.raises(UnavailableError):
            async for _ in mine:
                pass
        rest = [c async for c in theirs]  # the other tenant's stream on its own worker: untouched
        assert first.text + "".join(c.text for c in rest) == WORDS and rest[-1].completion_tokens == 40
        await wait_until(
            lambda: live.stack.workers[key] is not victim and bool(live.stack.workers[key].info),
            60,
            "restart",
        )
        restarted = live.stack.workers[key]
        assert restarted.port == victim.port and restarted.process.pid != victim.process.pid
        back = time.monotonic()
        answer = ""
        while not answer:  # the gateway's channel to that address reconnects by itself
            try:
                answer = (await acme.generate("back again", model="slow", timeout=10)).text
            except UnavailableError:
                assert time.monotonic() - back < 30, "the restarted worker is not reached"
                await asyncio.sleep(0.1)
        assert answer == "back again"
        await asyncio.sleep(1.0)
    # The mixed load on both tenants' other workers never saw the crash.
    assert not load.errors(), load.errors()
    assert load.by_tenant()["acme"] > 0 and load.by_tenant()["globex"] > 0
    kinds = [r["event"] for r in supervisor_events(live, domain.id)]
    crash = kinds.index("worker_exit")
    assert kinds[crash : crash + 3] == ["worker_exit", "domain_scrub", "worker_restart"]
    scrub = supervisor_events(live, domain.id)[crash + 1]
    assert scrub["phase"] == "crash" and scrub["verified"] is True and scrub["canary_hits"] == 0
    metrics = scrape(live.stack.supervisor_metrics_port)
    assert 'airlock_worker_restarts_total{model="slow",tenant="acme"} 1.0' in metrics
    assert 'airlock_worker_restarts_total{model="echo"' not in metrics
    assert 'airlock_worker_restarts_total{model="slow",tenant="globex"}' not in metrics


async def test_sigterm_drains_under_load(make_stack: Callable[[str], LiveStack], tmp_path: Path) -> None:
    live = make_stack(unmetered(tmp_path))
    gateway = live.stack.gateway
    assert gateway is not None
    async with Load(live) as load:
        clients = [live.client(t) for t in ("acme", "globex", "acme", "globex")]
        streams = [c.stream(DRAIN_WORDS, model="slow", max_tokens=100) for c in clients]
        firsts = [await s.__anext__() for s in streams]
        await asyncio.sleep(0.5)
        gateway.process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        draining = [asyncio.create_task(_drain(s)) for s in streams]
        # New calls are refused while the old ones are still running.
        async with live.client("globex") as late:
            while True:
                try:
                    await late.generate("too late?", model="echo", timeout=5)
                except UnavailableError as exc:
                    if exc.reason != "SERVER_CANCELLED":  # racing the moment the server stops: below
                        break
                assert time.monotonic() - sent < 10, "new calls were still served 10 s after SIGTERM"
                await asyncio.sleep(0.02)
        assert not any(t.done() for t in draining)  # refused during the drain, not after the exit
        rests = await asyncio.gather(*draining)
        code = await asyncio.to_thread(gateway.process.wait, GRACE_SECONDS + 5)
        exited = time.monotonic() - sent
        for client in clients:
            await client.close()
    for first, rest in zip(firsts, rests, strict=True):  # every in-flight stream ran to its end
        assert first.text + "".join(c.text for c in rest) == DRAIN_WORDS
        assert rest[-1].completion_tokens == 100
    assert code == 0 and exited < GRACE_SECONDS + 5
    assert len(load.ok(until=sent)) > 0
    # Calls made before the signal succeeded; later ones were refused with UNAVAILABLE, the
    # retryable "go to another replica" status. A call arriving in the instant gRPC's server.stop()
    # begins is CANCELLED by gRPC core (received, not yet handed to the application); the SDK
    # gives its caller UNAVAILABLE for that too (SERVER_CANCELLED), and only right at the signal.
    # Once the gateway has stopped listening, a new connection is refused: UNAVAILABLE with the
    # SDK's one-line reason for it (CONNECT_REFUSED, airlock/connection.py).
    assert not load.errors(until=sent - 0.5), load.errors(until=sent - 0.5)
    allowed = {
        "UnavailableError/UNAVAILABLE",
        "UnavailableError/SERVER_CANCELLED",
        "UnavailableError/CONNECT_REFUSED",
    }
    assert set(load.errors()) <= allowed, load.errors()
    cancelled = [o for o in load.outcomes if o.error == "UnavailableError/SERVER_CANCELLED"]
    assert all(abs(o.started - sent) < 2.0 for o in cancelled), cancelled
    print(
        f"\nSIGTERM under load: {len(load.ok(since=sent))} calls finished after the signal, "
        f"refusals {dict(load.errors())}"
    )


async def _drain(stream: Any) -> list[Any]:
    return [c async for c in stream]


async def test_corrupt_policy_keeps_the_old_one_until_fixed(
    make_stack: Callable[[str], LiveStack], tmp_path: Path
) -> None:
    policy = tmp_path / "policy"
    live = make_stack(unmetered(tmp_path))
    metrics_port = live.stack.metrics_port
    newcomer = mint_dev_token(live.pki, live.config.auth, tenant="acme", subject="newcomer")

    def reloads(result: str) -> float:
        for line in scrape(metrics_port).splitlines():
            if line.startswith(f'airlock_policy_reloads_total{{result="{result}"}} '):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    async def newcomer_allowed() -> bool:
        async with live.client("acme", token=newcomer) as client:
            try:
                await client.generate("hi", model="echo", timeout=10)
            except PermissionDeniedError:
                return False
        return True

    csv = (policy / "policy.csv").read_bytes()
    async with Load(live) as load:
        await asyncio.sleep(1.0)
        assert not await newcomer_allowed()
        # Half a file, then bytes that are not text: what a failed copy leaves behind.
        replace(policy / "policy.csv", csv[: len(csv) // 2] + b"\xff\xfe\x00garbage,,\n")
        await wait_until(lambda: reloads("rejected") >= 1, 30, "rejected reload")
        await asyncio.sleep(1.0)
        assert not await newcomer_allowed()  # the old policy serves: neither lost nor half-applied
        fixed = csv + b"g, acme/newcomer, user, acme\n"
        replace(policy / "policy.csv", fixed)
        await wait_until(lambda: reloads("accepted") >= 1, 30, "accepted reload")
        assert await newcomer_allowed()
        await asyncio.sleep(1.0)
    assert not load.errors(), load.errors()
    assert load.by_tenant()["acme"] > 0 and load.by_tenant()["globex"] > 0
    assert "policy reload rejected" in gateway_log(live)


def _mount_tmpfs(directory: Path, size: str) -> str | None:
    """Mount a small tmpfs (a real filesystem that fills up); the reason when that is impossible."""
    directory.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(directory)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run mount: {exc}"
    return None if done.returncode == 0 else f"cannot mount a tmpfs here: {done.stderr.strip()}"


def _fill(directory: Path) -> None:
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError:  # ENOSPC: the filesystem is full
        pass
    finally:
        os.close(fd)


async def test_full_audit_disk_fails_closed(make_stack: Callable[[str], LiveStack], tmp_path: Path) -> None:
    disk = tmp_path / "auditfs"
    reason = _mount_tmpfs(disk, "2m")
    if reason is not None:
        pytest.skip(f"{reason} (tests/e2e/test_audit_stack.py covers the /dev/full variant)")
    try:
        live = make_stack(unmetered(tmp_path, f'\n[audit]\npath = "{disk / "gateway.jsonl"}"\n'))
        async with Load(live) as load:
            await asyncio.sleep(1.0)
            filled = time.monotonic()  # from here on a refusal is expected
            _fill(disk)
            await wait_until(lambda: load.errors(since=filled), 30, "a refusal after the disk filled")
            refusing = time.monotonic()
            await wait_until(lambda: _status(live, "NOT_SERVING"), 30, "health NOT_SERVING")
            (disk / "filler").unlink()  # space is back, but the chain has a hole: keep refusing
            await asyncio.sleep(2.0)
        # Calls still in flight when the disk filled are refused too (their record can't be written).
        assert len(load.ok(until=filled)) > 0 and not load.errors(until=filled - 1.0)
        # Fail closed: from the first refusal on, no call of either tenant was served unaudited.
        assert set(load.errors()) == {"UnavailableError/AUDIT_UNAVAILABLE"}, load.errors()
        assert not load.ok(since=refusing)
        assert {o.tenant for o in load.outcomes if o.started >= refusing} == {"acme", "globex"}
        assert await live.health() == "NOT_SERVING"
        assert "audit log unavailable: " in gateway_log(live)
        live.stack.stop(timeout=10)
        # No torn record was left behind: what was written before the disk filled verifies, and
        # with room again a restarted gateway continues the same chain (here: its audit log alone).
        trail, key = disk / "gateway.jsonl", load_public_key(live.pki.audit_pub)
        report = verify_log(trail, None)  # the chain (the gateway had no time to sign its head yet)
        assert report.ok and report.records > 0, report.problems
        reopened = AuditLog(trail, signing_key=load_signing_key(live.pki.audit_key))
        reopened.record("reliability_check", note="disk has room again")
        reopened.close()
        resumed = verify_log(trail, key)
        assert resumed.ok and resumed.records == report.records + 1, resumed.problems
        assert resumed.unsigned_tail == 0
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False, capture_output=True)


async def _status(live: LiveStack, wanted: str) -> bool:
    return await live.health() == wanted


async def test_redis_outage_refuses_then_recovers(
    make_stack: Callable[[str], LiveStack], tmp_path: Path
) -> None:
    from tests.redis_server import RedisServer

    if RedisServer.binary() is None:
        pytest.skip("redis-server is not installed (scripts/bootstrap.sh installs it with apt as root)")
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    try:
        policy = make_policy_dir(tmp_path / "policy")
        quota = (  # generous: every call is metered in Redis, none is refused for its budget
            "requests_per_second = 1000\nburst = 1000\n"
            "tokens_per_minute = 10000000\nconcurrent_streams = 100\n"
        )
        (policy / "tenants.toml").write_text(
            "".join(
                f'[tenants.{t}]\nissuers = ["airlock-dev"]\n[tenants.{t}.quota]\n{quota}'
                for t in ("acme", "globex")
            )
        )
        live = make_stack(
            f'policy_dir = "{policy}"\n[quota]\nbackend = "redis"\nredis_url = "{redis.url}"\n'
            f'key_prefix = "rel:{uuid.uuid4().hex}"\n' + STACK
        )
        async with Load(live) as load:
            await asyncio.sleep(2.0)
            stopping = time.monotonic()
            redis.stop()
            down = time.monotonic()
            await wait_until(lambda: load.errors(since=down), 30, "a refusal while Redis is down")
            await asyncio.sleep(2.0)
            restarting = time.monotonic()
            redis.restart()
            up = time.monotonic()
            await wait_until(lambda: load.ok(since=up), 30, "a served call after Redis is back")
            recovered = time.monotonic()
            await asyncio.sleep(2.0)
        # While Redis was up, nothing was refused. A call that started while it was being stopped
        # (or just before: its admission runs a moment after it starts) may be refused (CI saw one).
        healthy = stopping - 1.0
        assert not load.errors(until=healthy) and len(load.ok(until=healthy)) > 0
        # Never unmetered: no call made while Redis was down was served before Redis was back (a
        # call may wait out the client's reconnect backoff, and is then admitted and metered).
        unmetered = [o for o in load.ok(since=down) if o.finished < restarting]
        assert not unmetered, unmetered
        refusals = [o.finished - o.started for o in load.outcomes if o.error]
        assert set(load.errors()) == {"UnavailableError/QUOTA_STORE_UNAVAILABLE"}, load.errors()
        assert {o.tenant for o in load.ok(since=recovered)} == {"acme", "globex"}
        assert not load.errors(since=recovered + 0.5), load.errors(since=recovered + 0.5)
        print(
            f"\nredis outage: {len(refusals)} refusals, slowest {max(refusals):.2f} s; "
            f"served again {recovered - up:.2f} s after Redis restarted"
        )
    finally:
        redis.stop()
