"""Quotas in policy/tenants.toml: validated (a bad value refuses the whole policy) and hot-reloaded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gateway.audit import AuditLog
from gateway.policy.authz import Authorizer
from gateway.policy.rules import PolicyError, load_policy
from gateway.quota import QuotaLimits

REPO_POLICY = Path(__file__).resolve().parents[2] / "policy"


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policy"
    shutil.copytree(REPO_POLICY, directory)
    return directory


def tenants(quota: str, other: str = "") -> str:
    issuers = 'issuers = ["airlock-dev"]'
    return f"[tenants.acme]\n{issuers}\n{quota}\n[tenants.globex]\n{issuers}\n{other}"


def test_quota_settings_load(policy_dir: Path) -> None:
    (policy_dir / "tenants.toml").write_text(
        tenants(
            "[tenants.acme.quota]\nrequests_per_second = 2.5\nburst = 10\ntokens_per_minute = 6000\n"
            "concurrent_streams = 4\n"
        )
    )
    loaded = load_policy(policy_dir).tenants
    assert loaded["acme"].quota == QuotaLimits(2.5, 10, 6000, 4)
    assert loaded["globex"].quota == QuotaLimits()  # no table: not limited
    assert loaded["globex"].quota.unlimited
    assert QuotaLimits(requests_per_second=2.5).bucket == 3  # default burst: one second's worth


def test_the_repository_policy_sets_quotas_for_its_tenants() -> None:
    loaded = load_policy(REPO_POLICY).tenants
    assert all(not settings.quota.unlimited for settings in loaded.values())


@pytest.mark.parametrize(
    ("quota", "reason"),
    [
        ("requests_per_second = 0", "requests_per_second: must be a positive number, got 0"),
        ("requests_per_second = -1", "must be a positive number"),
        ("requests_per_second = nan", "must be a positive number"),
        ("requests_per_second = inf", "must be a positive number"),
        ('requests_per_second = "5"', "must be a positive number"),
        ("requests_per_second = true", "must be a positive number"),
        ("tokens_per_minute = 1.5", "tokens_per_minute: must be a positive integer"),
        ("tokens_per_minute = 0", "tokens_per_minute: must be a positive integer"),
        ("concurrent_streams = -2", "concurrent_streams: must be a positive integer"),
        ("burst = 3", "burst: only meaningful with requests_per_second"),
        ("requests_per_second = 1\nburst = 0.5", "burst: must be a positive integer"),
        ("tokens_per_min = 100", "tokens_per_min: unknown key"),
    ],
)
def test_bad_quota_values_refuse_the_policy(policy_dir: Path, quota: str, reason: str) -> None:
    path = policy_dir / "tenants.toml"
    path.write_text(tenants(f"[tenants.acme.quota]\n{quota}\n"))
    with pytest.raises(PolicyError) as err:
        load_policy(policy_dir)
    assert str(err.value).startswith(f"{path}: tenants.acme.quota"), err.value
    assert reason in str(err.value)


def test_a_quota_that_is_not_a_table_is_refused(policy_dir: Path) -> None:
    (policy_dir / "tenants.toml").write_text('[tenants.acme]\nissuers = ["airlock-dev"]\nquota = 5\n'
                                             '[tenants.globex]\n')  # fmt: skip
    with pytest.raises(PolicyError, match=r"tenants\.acme\.quota: must be a table"):
        load_policy(policy_dir)


async def test_quotas_reload_with_the_policy_and_a_bad_one_keeps_the_old(
    policy_dir: Path, tmp_path: Path
) -> None:
    path = policy_dir / "tenants.toml"
    path.write_text(tenants("[tenants.acme.quota]\nconcurrent_streams = 2\n"))
    authorizer = Authorizer.from_directory(policy_dir, audit=AuditLog(tmp_path / "audit.jsonl"))
    assert authorizer.policy.tenants["acme"].quota.concurrent_streams == 2
    path.write_text(tenants("[tenants.acme.quota]\nconcurrent_streams = 5\n"))
    assert await authorizer.reload() is True
    assert authorizer.policy.tenants["acme"].quota.concurrent_streams == 5
    path.write_text(tenants("[tenants.acme.quota]\nconcurrent_streams = 0\n"))  # a typo must not lift it
    assert await authorizer.reload() is False
    assert authorizer.policy.tenants["acme"].quota.concurrent_streams == 5
    assert "concurrent_streams" in (tmp_path / "audit.jsonl").read_text()  # the refusal is audited
