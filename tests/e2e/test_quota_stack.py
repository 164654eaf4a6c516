"""Quotas, metrics and request audit through real gateway and worker processes (echo engines).

One private stack per scenario, with a policy whose tenants.toml sets tight quotas for acme and
none that matter for globex; the metrics endpoint of the live gateway is scraped over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from airlock import QuotaExceededError
from tests.conftest import make_policy_dir
from tests.support import LiveStack

WORDS = " ".join(f"w{i}" for i in range(200))

ACME_TIGHT = """
[tenants.acme]
issuers = ["airlock-dev"]

[tenants.acme.quota]
requests_per_second = 0.001
burst = {burst}
tokens_per_minute = 100
concurrent_streams = 1

[tenants.globex]
issuers = ["airlock-dev"]

[tenants.globex.quota]
requests_per_second = 0.001
burst = 50
"""


def stack_toml(policy: Path, extra: str = "") -> str:
    return f"""
policy_dir = "{policy}"
{extra}
[gateway]
metrics_listen = "127.0.0.1:0"
max_tokens = 512
default_max_tokens = 64

[models.echo]
engine = "echo"

[models.slow]
engine = "echo"
tokens_per_second = 4

[tenants.acme]
models = ["echo", "slow"]

[tenants.globex]
models = ["echo"]
"""


def policy_with(directory: Path, tenants_toml: str) -> Path:
    make_policy_dir(directory)
    (directory / "tenants.toml").write_text(tenants_toml)
    return directory


def scrape(stack: LiveStack) -> dict[str, float]:
    """The endpoint's samples as {'name{labels}': value}."""
    port = stack.stack.metrics_port
    assert port is not None
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


async def refused(stack: LiveStack, **params: object) -> QuotaExceededError:
    async with stack.client("acme") as client:
        with pytest.raises(QuotaExceededError) as err:
            await client.generate("x", model="echo", **params)  # type: ignore[arg-type]
    return err.value


async def test_quotas_metrics_and_audit_end_to_end(
    make_stack: Callable[[str], LiveStack], tmp_path: Path
) -> None:
    policy = policy_with(tmp_path / "policy", ACME_TIGHT.format(burst=30))
    stack = make_stack(stack_toml(policy))
    canary = f"canary-{uuid.uuid4().hex}"
    ids = f"q{uuid.uuid4().hex[:8]}"
    async with stack.client("acme") as acme, stack.client("globex") as globex:
        # Tokens: 60 are reserved per call and the 57 not generated come back, so a second call fits
        # in the 100/min budget right away (without the refund only 40 would be left).
        first = await acme.generate(f"a b {canary}", model="echo", max_tokens=60, request_id=f"{ids}-1")
        assert first.completion_tokens == 3
        await acme.generate("a b c", model="echo", max_tokens=60, request_id=f"{ids}-2")

        # Concurrency: acme's one slot is held by a slow stream; acme is refused, globex is not.
        stream = acme.stream(WORDS, model="slow", max_tokens=60, request_id=f"{ids}-3")
        await stream.__anext__()
        busy = await refused(stack, max_tokens=1)
        assert busy.reason == "CONCURRENCY_LIMITED"
        assert busy.retry_after is not None and busy.retry_after > 0
        assert busy.subject == "tenant:acme"
        for _ in range(3):
            assert (await globex.generate("hi", model="echo")).text == "hi"
        await stream.aclose()  # type: ignore[attr-defined]  # the caller goes away mid-stream

        # The slot comes back once the gateway sees the cancellation.
        deadline = time.monotonic() + 30
        while True:
            try:
                await acme.generate("a", model="echo", max_tokens=1, request_id=f"{ids}-4")
                break
            except QuotaExceededError as exc:
                assert exc.reason == "CONCURRENCY_LIMITED" and time.monotonic() < deadline
                await asyncio.sleep(0.1)

        too_big = await refused(stack, max_tokens=101)  # more than a minute's budget: never
        assert too_big.reason == "TOKEN_QUOTA_EXCEEDED" and too_big.retry_after is None

        # Requests: every call spends one of the burst of 30, refused ones too, so refusals alone
        # run it out (docs/quotas.md); then a valid call is refused as well.
        for _ in range(30):
            spent = await refused(stack, max_tokens=101)
            if spent.reason == "RATE_LIMITED":
                break
            assert spent.reason == "TOKEN_QUOTA_EXCEEDED"
        assert spent.reason == "RATE_LIMITED"
        limited = await refused(stack, max_tokens=1)
        assert (
            limited.reason == "RATE_LIMITED" and limited.retry_after is not None and limited.retry_after > 1
        )
        assert (await globex.generate("still fine", model="echo")).text == "still fine"

    metrics = scrape(stack)
    assert metrics['airlock_quota_rejections_total{reason="CONCURRENCY_LIMITED",tenant="acme"}'] >= 1
    assert metrics['airlock_quota_rejections_total{reason="TOKEN_QUOTA_EXCEEDED",tenant="acme"}'] >= 2
    assert metrics['airlock_quota_rejections_total{reason="RATE_LIMITED",tenant="acme"}'] == 2
    assert not any("globex" in k for k in metrics if k.startswith("airlock_quota_rejections_total"))
    assert metrics['airlock_requests_total{code="OK",method="generate",tenant="globex"}'] == 4
    assert metrics['airlock_requests_total{code="OK",method="generate",tenant="acme"}'] == 3
    assert metrics['airlock_requests_total{code="CANCELLED",method="stream",tenant="acme"}'] == 1
    assert metrics['airlock_request_duration_seconds_count{method="generate",tenant="globex"}'] == 4
    assert metrics['airlock_tokens_total{kind="completion",tenant="globex"}'] == 5  # 3 x "hi", "still fine"
    assert metrics['airlock_concurrent_streams{tenant="acme"}'] == 0
    assert metrics['airlock_authz_decisions_total{decision="allow",tenant="acme"}'] >= 8
    tenants = {k.split('tenant="')[1].split('"')[0] for k in metrics if 'tenant="' in k}
    assert tenants <= {"acme", "globex", "other"}  # bounded label values

    audit = stack.config.state_dir / "audit" / "gateway.jsonl"
    mine = [r for r in map(json.loads, audit.read_text().splitlines())
            if r["event"] == "request" and r.get("request_id", "").startswith(ids)]  # fmt: skip
    by_id = {r["request_id"]: r for r in mine}
    expected = {"tenant": "acme", "subject": "acme/tester", "model": "echo", "code": "OK",
                "method": "generate", "completion_tokens": 3}  # fmt: skip
    assert by_id[f"{ids}-1"] | expected == by_id[f"{ids}-1"]
    assert by_id[f"{ids}-1"]["prompt_tokens"] > 0 and by_id[f"{ids}-1"]["latency_ms"] > 0
    assert by_id[f"{ids}-3"]["code"] == "CANCELLED" and by_id[f"{ids}-3"]["method"] == "stream"
    # The canary prompt is nowhere on disk: not in the audit trail, not in any process log.
    files = [*stack.config.state_dir.rglob("*.jsonl"), *tmp_path.rglob("*.log")]
    assert audit in files and len(files) >= 4  # the audit trail, the gateway's and 3 workers' logs
    for path in files:
        assert canary not in path.read_text(errors="replace"), path


async def test_two_gateway_replicas_share_one_budget_through_redis(
    make_stack: Callable[[str], LiveStack], tmp_path: Path, redis_url: str
) -> None:
    policy = policy_with(tmp_path / "policy", ACME_TIGHT.format(burst=4))
    quota = f'[quota]\nbackend = "redis"\nredis_url = "{redis_url}"\nkey_prefix = "e2e:{uuid.uuid4().hex}"\n'
    one, two = make_stack(stack_toml(policy, quota)), make_stack(stack_toml(policy, quota))
    assert one.address != two.address
    for stack in (one, two, one, two):
        async with stack.client("acme") as client:
            await client.generate("a", model="echo", max_tokens=1)
    for stack in (one, two):  # four calls spent the burst of four, whichever replica served them
        assert (await refused(stack, max_tokens=1)).reason == "RATE_LIMITED"
    async with two.client("globex") as globex:
        assert (await globex.generate("hi", model="echo")).text == "hi"
    assert scrape(one)['airlock_quota_rejections_total{reason="RATE_LIMITED",tenant="acme"}'] == 1


async def test_quotas_reload_with_the_policy_and_a_broken_edit_keeps_them(
    make_stack: Callable[[str], LiveStack], tmp_path: Path
) -> None:
    tight = '[tenants.acme]\nissuers = ["airlock-dev"]\n[tenants.acme.quota]\ntokens_per_minute = {}\n'
    other = '[tenants.globex]\nissuers = ["airlock-dev"]\n'
    policy = policy_with(tmp_path / "policy", tight.format(10) + other)
    stack = make_stack(stack_toml(policy))
    assert (await refused(stack, max_tokens=20)).reason == "TOKEN_QUOTA_EXCEEDED"

    async def reload_to(text: str, result: str) -> None:
        before = scrape(stack).get(f'airlock_policy_reloads_total{{result="{result}"}}', 0.0)
        tmp = tmp_path / "tenants.toml.new"  # written outside the watched directory, renamed in
        tmp.write_text(text)
        tmp.replace(policy / "tenants.toml")
        deadline = time.monotonic() + 30
        while scrape(stack).get(f'airlock_policy_reloads_total{{result="{result}"}}', 0.0) == before:
            assert time.monotonic() < deadline, f"no {result} reload seen"
            await asyncio.sleep(0.1)

    await reload_to(tight.format(30) + other, "accepted")
    async with stack.client("acme") as client:
        assert (await client.generate("a b", model="echo", max_tokens=20)).completion_tokens == 2
    await reload_to(tight.format(0) + other, "rejected")  # 0 is a mistake, not "unlimited"
    async with stack.client("acme") as client:
        await client.generate("a b", model="echo", max_tokens=20)  # 30/min still serves
    too_big = await refused(stack, max_tokens=31)  # and still limits: neither lifted nor reset to 10
    assert too_big.reason == "TOKEN_QUOTA_EXCEEDED" and too_big.retry_after is None
