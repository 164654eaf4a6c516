"""`airlock usage` from an audit trail (rotated files too), and the lines `airlock up` prints for the
gateway's audit records."""

from __future__ import annotations

from pathlib import Path

import pytest

from control.cli import main
from control.events import AuditFollower, describe
from control.usage import parse_since, usage
from gateway.audit import AuditLog
from gateway.config import AuditConfig


def trail(path: Path, rotate_bytes: int = 0) -> AuditLog:
    return AuditLog(path, config=AuditConfig(rotate_bytes=rotate_bytes))


def test_usage_counts_requests_tokens_and_refusals_per_tenant(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "gateway.jsonl"
    log = trail(path, rotate_bytes=600)  # several rotated files
    for _ in range(3):
        log.record("request", tenant="acme", outcome="ok", code="OK", prompt_tokens=4, completion_tokens=6)
    log.record("request", tenant="acme", outcome="error", code="RESOURCE_EXHAUSTED", prompt_tokens=0,
               completion_tokens=0)  # fmt: skip
    log.record("authorization", decision="deny", tenant="globex", subject="globex/x")
    log.record("rate_limited", tenant="globex", refused=7, last_subject="globex/x")
    log.record("authentication", decision="refused", reason="TOKEN_BAD_SIGNATURE")
    log.close()
    assert len(list(path.parent.glob("gateway.jsonl.*"))) > 0
    report = usage(path)
    acme, globex = report.tenants["acme"], report.tenants["globex"]
    assert (acme.requests, acme.ok, acme.failed, acme.quota_refused) == (4, 3, 1, 1)
    assert (acme.prompt_tokens, acme.completion_tokens) == (12, 18)
    assert (globex.denied, globex.rate_limited, globex.requests) == (1, 7, 0)
    assert report.unauthenticated == 1
    assert list(usage(path, tenant="globex").tenants) == ["globex"]
    assert usage(path, since=parse_since("1h")).tenants["acme"].requests == 4
    assert usage(path, since=parse_since("2999-01-01")).tenants == {}


def test_since_reads_durations_and_times() -> None:
    assert parse_since("30m", now=10_000.0) == 10_000.0 - 1800
    assert parse_since("2d", now=200_000.0) == 200_000.0 - 172_800
    with pytest.raises(ValueError, match="a duration"):
        parse_since("yesterday")


def test_usage_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = trail(tmp_path / "audit" / "gateway.jsonl")
    log.record("request", tenant="acme", outcome="ok", code="OK", prompt_tokens=2, completion_tokens=3)
    log.close()
    assert main(["usage", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "acme" in out and "REQUESTS" in out
    assert main(["usage", "--state-dir", str(tmp_path), "--since", "soon"]) == 2
    assert main(["usage", "--state-dir", str(tmp_path / "none")]) == 1


def test_up_describes_the_gateways_significant_records(tmp_path: Path) -> None:
    path = tmp_path / "gateway.jsonl"
    log = trail(path)
    log.record("request", tenant="acme", outcome="ok")  # ordinary: no line
    follower = AuditFollower(path)  # from here on
    log.record("policy_reload", result="rejected", generation=3, reason="/p/policy.csv:12: bad effect")
    log.record("policy_reload", result="accepted", generation=4, rules=9, links=8, lint_warnings=2)
    log.record(
        "lockout", kind="authorization", key="subject:acme/mallory", subject="acme/mallory", seconds=300
    )
    log.record("request", tenant="acme", outcome="ok")
    log.close()
    assert follower.lines() == [
        "policy reload REJECTED; generation 3 keeps serving: /p/policy.csv:12: bad effect",
        "policy generation 4 in service (9 rules, 8 role links, 2 lint warning(s): `airlock policy lint`)",
        "lockout: authorization failures locked acme/mallory out for 300 s (`airlock lockout list|clear`)",
    ]
    assert follower.lines() == []
    assert describe({"event": "routes_set", "added": ["initech/echo"], "removed": []}) == (
        "gateway routes: +initech/echo; -none"
    )
