"""Hot reload of the policy directory in a live gateway: under load, broken files, lockouts."""

from __future__ import annotations

import asyncio
import os
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from airlock import AuthenticationError, PermissionDeniedError
from tests.conftest import ECHO_TOML, make_policy_dir
from tests.support import LiveStack


def private_toml(policy: Path, lockout: str = "max_failures = 0\nmax_auth_failures_per_peer = 0") -> str:
    return (
        f'policy_dir = "{policy}"\n'
        + ECHO_TOML.replace("[gateway]\n", '[gateway]\nmetrics_listen = "127.0.0.1:0"\n')
        + f"\n[lockout]\n{lockout}\n"
    )


def metric(stack: LiveStack, name: str, labels: str = "") -> float:
    port = stack.stack.metrics_port
    assert port is not None
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(f"{name}{labels} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def replace(path: Path, text: str) -> None:
    """Write the way deploy tools do: a new file, made outside the watched directory, renamed in."""
    tmp = path.parent.parent / f"{path.name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)


async def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.1)


async def test_reloads_under_load_lose_no_request_and_a_broken_policy_keeps_the_old_one(
    make_stack: Callable[[str], LiveStack], tmp_path: Path
) -> None:
    policy = make_policy_dir(tmp_path / "policy")
    stack = make_stack(private_toml(policy))
    csv = (policy / "policy.csv").read_text()
    failures: list[BaseException] = []
    done = 0
    stop = asyncio.Event()

    async def load(tenant: str) -> None:
        nonlocal done
        async with stack.client(tenant) as client:
            while not stop.is_set():
                try:
                    if done % 2:
                        await client.generate("steady", model="echo")
                    else:
                        [c async for c in client.stream("steady load", model="echo")]
                    done += 1
                except Exception as exc:  # every failure counts, whatever its kind
                    failures.append(exc)

    workers = [asyncio.create_task(load(t)) for t in ("acme", "acme", "globex", "globex")]
    try:
        generation = metric(stack, "airlock_policy_generation")
        for i in range(3):  # valid edits: each becomes a new generation while calls keep flowing
            replace(policy / "policy.csv", csv + f"\ng, acme/extra{i}, user, acme\n")
            await wait_for(lambda g=generation + i + 1: metric(stack, "airlock_policy_generation") >= g)
        # A broken file is refused; the last good generation keeps serving.
        good = metric(stack, "airlock_policy_generation")
        replace(policy / "policy.csv", csv + "\np, user, acme, model:*\n")
        await wait_for(lambda: metric(stack, "airlock_policy_reloads_total", '{result="rejected"}') >= 1)
        # A policy whose own test cases fail is refused too.
        replace(policy / "policy.csv", csv.replace("g, acme/bob, user, acme", ""))
        await wait_for(lambda: metric(stack, "airlock_policy_reloads_total", '{result="rejected"}') >= 2)
        before = done
        await wait_for(lambda: done > before + 20)
        assert metric(stack, "airlock_policy_generation") == good
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert failures == []
    assert done > 50
    assert metric(stack, "airlock_policy_reloads_total", '{result="accepted"}') >= 3
    log = stack.stack.gateway.log.read_text() if stack.stack.gateway else ""
    assert "policy reload rejected" in log and "a p line has 5 fields" in log


async def test_a_reloaded_deny_takes_effect_without_a_restart(
    make_stack: Callable[[str], LiveStack], tmp_path: Path
) -> None:
    policy = make_policy_dir(tmp_path / "policy")
    stack = make_stack(private_toml(policy))
    async with stack.client("acme") as client:
        assert (await client.generate("before", model="echo")).text == "before"
        with (policy / "policy.csv").open("a") as fh:
            fh.write("p, acme/tester, acme, model:echo, generate, deny\n")
        await wait_for(lambda: metric(stack, "airlock_policy_generation") >= 2)
        with pytest.raises(PermissionDeniedError) as err:
            await client.generate("after", model="echo")
        assert err.value.reason == "POLICY_DENIED"
        assert (await client.generate("other model", model="slow", max_tokens=2)).completion_tokens == 2


async def test_a_file_that_crashed_the_reload_does_not_stop_a_later_revocation(
    make_stack: Callable[[str], LiveStack], tmp_path: Path
) -> None:
    """A field over 131,072 characters raised `_csv.Error` out of the reload: the watch task died
    silently, and a revocation shipped afterwards was never enforced until a restart."""
    policy = make_policy_dir(tmp_path / "policy")
    stack = make_stack(private_toml(policy))
    csv = (policy / "policy.csv").read_text()
    async with stack.client("acme") as client:
        assert (await client.generate("before", model="echo")).text == "before"
        replace(policy / "policy.csv", csv + f"p, acme/{'x' * 131_072}, acme, models, list, allow\n")
        await wait_for(lambda: metric(stack, "airlock_policy_reloads_total", '{result="rejected"}') >= 1)
        assert (await client.generate("still served", model="echo")).text == "still served"
        # The revocation: a deny for the caller, shipped after the bad file.
        replace(policy / "policy.csv", csv + "p, acme/tester, acme, model:echo, generate, deny\n")
        await wait_for(lambda: metric(stack, "airlock_policy_generation") >= 2)
        with pytest.raises(PermissionDeniedError) as err:
            await client.generate("after", model="echo")
        assert err.value.reason == "POLICY_DENIED"
    assert metric(stack, "airlock_watch_errors_total", '{watcher="policy"}') == 0
    # The rejection is logged and audited, and the 131,072-character value is in neither.
    log = stack.stack.gateway.log.read_text() if stack.stack.gateway else ""
    assert "policy reload rejected" in log and "longer than the 4096" in log and "x" * 1000 not in log
    audit = (stack.config.state_dir / "audit" / "gateway.jsonl").read_text().splitlines()
    rejected = [line for line in audit if '"event":"policy_reload"' in line and '"result":"rejected"' in line]
    assert rejected and all(len(line) < 4000 for line in rejected)


async def test_lockout_after_repeated_denials_and_failures_hits_only_that_identity(
    make_stack: Callable[[str], LiveStack], tmp_path: Path
) -> None:
    policy = make_policy_dir(tmp_path / "policy")
    lockout = "max_failures = 3\nmax_auth_failures_per_peer = 3\nwindow_seconds = 30\nlockout_seconds = 2"
    stack = make_stack(private_toml(policy, lockout))
    # stranger/forger: same peer as tester; stranger has no role, forger's signature is broken.
    # stranger's denials lock out stranger (a verified identity); forger's failures lock out the
    # peer, which only changes the answer to credentials that fail anyway (tests/security/
    # test_lockout_abuse.py).
    async with (
        stack.client("acme") as tester,
        stack.client("acme", token=_token(stack, "stranger")) as stranger,
        stack.client("acme", token=_token(stack, "forger") + "x") as forger,
    ):
        for _ in range(3):
            with pytest.raises(PermissionDeniedError) as denied:
                await stranger.generate("hi", model="echo")
            assert denied.value.reason == "POLICY_DENIED"
        with pytest.raises(PermissionDeniedError) as locked:
            await stranger.generate("hi", model="echo")
        assert locked.value.reason == "LOCKED_OUT"
        for _ in range(3):
            with pytest.raises(AuthenticationError) as bad:
                await forger.generate("hi", model="echo")
            assert bad.value.reason == "TOKEN_INVALID"  # the signature no longer decodes
        with pytest.raises(AuthenticationError) as locked_auth:
            await forger.generate("hi", model="echo")
        assert locked_auth.value.reason == "LOCKED_OUT"
        # Everyone else, from the same peer, is unaffected.
        assert (await tester.generate("still fine", model="echo")).text == "still fine"
        assert metric(stack, "airlock_lockouts_total", '{kind="authorization"}') == 1
        assert metric(stack, "airlock_lockouts_total", '{kind="authentication"}') == 1
        await asyncio.sleep(2.2)  # the lockout expires: back to the policy's own answer
        with pytest.raises(PermissionDeniedError) as again:
            await stranger.generate("hi", model="echo")
        assert again.value.reason == "POLICY_DENIED"
    audit = [line for line in (stack.config.state_dir / "audit" / "gateway.jsonl").read_text().splitlines()
             if '"event":"lockout"' in line]  # fmt: skip
    assert any('"kind":"authorization"' in line and "acme/stranger" in line for line in audit)


def _token(stack: LiveStack, subject: str) -> str:
    from control.tokens import mint_dev_token

    return mint_dev_token(stack.pki, stack.config.auth, tenant="acme", subject=subject)
