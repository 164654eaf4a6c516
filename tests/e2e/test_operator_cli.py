"""`airlock up --detach`, `status`, `usage` and `down` on a live stack, and the one line `up` prints
for a worker crash (with its restart after the scrub) and for a rejected policy reload."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from control.runfile import process_alive
from tests.e2e.cli_stack import CliStack


@pytest.fixture
def detached(tmp_path: Path) -> Iterator[CliStack]:
    stack = CliStack(tmp_path)
    started = stack.run("up", "--detach")
    assert started.returncode == 0, started.stdout + started.stderr
    assert "running in the background: launcher pid" in started.stdout
    assert "Airlock is up" in started.stderr and "metrics: http://127.0.0.1:" in started.stderr
    assert f"policy: {stack.policy} (watched" in started.stderr
    yield stack
    info = stack.info()
    if info is not None and process_alive(info["pid"]):
        os.kill(info["pid"], signal.SIGTERM)


async def test_status_usage_and_down_on_a_detached_stack(detached: CliStack) -> None:
    stack = detached
    info = stack.info()
    assert info is not None
    async with stack.client("acme") as acme, stack.client("globex") as globex:
        for _ in range(3):
            await acme.generate("one two three", model="echo")
        await globex.generate("four", model="echo")

    status = stack.run("status")
    assert status.returncode == 0, status.stderr
    out = status.stdout
    assert f"launcher pid {info['pid']}" in out and "SERVING" in out
    assert f"policy:   {stack.policy}: generation 1" in out and "no reload yet" in out
    for worker in info["workers"]:
        assert str(worker["pid"]) in out
    assert "running" in out and "ready" in out
    report = json.loads(stack.run("status", "--json").stdout)
    gateway = report["gateway"]
    assert gateway["serving"] is True and gateway["policy"]["generation"] == "1"
    tenants = {t["name"]: t for t in gateway["tenants"]}
    assert tenants["acme"]["requestsOk"] == "3" and tenants["globex"]["requestsOk"] == "1"
    assert tenants["acme"]["keys"][0]["keyId"].startswith("acme-")  # ids only: never material
    assert "material" not in json.dumps(report) and "wrapped" not in json.dumps(report)
    assert {(r["route"]["tenant"], r["ready"]) for r in gateway["routes"]} == {
        ("acme", True),
        ("globex", True),
    }
    assert [w["restarts"] for w in report["launcher"]["workers"]] == [0, 0]

    usage = stack.run("usage", "--json")
    assert usage.returncode == 0, usage.stderr
    rows = {row["tenant"]: row for row in json.loads(usage.stdout)["tenants"]}
    assert (rows["acme"]["requests"], rows["acme"]["ok"], rows["acme"]["prompt_tokens"]) == (3, 3, 9)
    assert rows["globex"]["completion_tokens"] == 1
    assert "acme" not in stack.run("usage", "--tenant", "globex").stdout

    again = stack.run("up", "--detach")
    assert again.returncode == 1 and f"a stack already runs from {stack.state}" in again.stderr

    down = stack.run("down")
    assert down.returncode == 0, down.stderr
    assert f"stopped (launcher pid {info['pid']})" in down.stdout
    assert not process_alive(info["pid"]) and not process_alive(info["gateway"]["pid"])
    assert not any(process_alive(w["pid"]) for w in info["workers"])
    run = stack.state / "run"
    assert sorted(p.name for p in run.iterdir() if not p.name.endswith(".log")) == []  # logs stay
    assert stack.run("status").returncode == 1


async def test_up_prints_a_crash_its_restart_and_a_rejected_policy(detached: CliStack) -> None:
    stack = detached
    log = stack.state / "run" / "up.log"
    info = stack.info()
    assert info is not None
    victim = next(w for w in info["workers"] if w["tenants"] == ["acme"])
    os.kill(victim["pid"], signal.SIGKILL)
    out = stack.wait_printed("worker-acme-echo restarted", log=log)
    assert f"worker-acme-echo (pid {victim['pid']}) exited with code -9; scrubbing cpu:" in out
    assert "scrubbed and verified (4.0 MiB); restarting worker-acme-echo in 0.2 s" in out

    csv = stack.policy / "policy.csv"
    good = csv.read_text()
    csv.write_text(good + "p, acme/bob, acme, model:*, generate, allw\n")
    line = len(good.splitlines()) + 1
    out = stack.wait_printed("policy reload REJECTED", log=log)
    assert f"generation 1 keeps serving: {csv}:{line}: effect must be allow or deny" in out
    status = stack.run("status").stdout
    assert "last reload rejected" in status and f"{csv}:{line}" in status
    await asyncio.sleep(0.5)
    csv.write_text(good)
    stack.wait_printed("policy generation 2 in service", log=log)
    info = stack.info()
    assert info is not None
    assert next(w for w in info["workers"] if w["tenants"] == ["acme"])["restarts"] == 1
    assert stack.run("down").returncode == 0
