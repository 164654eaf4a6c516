"""`airlock tenant add|remove|list`: edits shown as diffs, written only with --write, checked whole,
and a removal that undoes an addition exactly."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from control.cli import main
from control.tenants import TenantEditError, add_tenant
from gateway import config as config_mod
from tests.conftest import make_policy_dir

CONFIG = """
[models.echo]
engine = "echo"

[tenants.acme]
models = ["echo"]

[tenants.globex]
models = ["echo"]
"""


@pytest.fixture
def site(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    policy = make_policy_dir(tmp_path / "policy")
    config = tmp_path / "airlock.toml"
    config.write_text(f'policy_dir = "{policy}"\n' + textwrap.dedent(CONFIG))
    return config, policy, ["--config", str(config), "--state-dir", str(tmp_path / "state")]


def files(config: Path, policy: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in (config, *sorted(policy.iterdir()))}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_add_shows_the_diff_and_writes_nothing_without_write(
    site: tuple[Path, Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    config, policy, common = site
    before = files(config, policy)
    code, out = run(capsys, "tenant", "add", "initech", "--model", "echo", "--user", "alice",
                    "--requests-per-second", "5", *common)  # fmt: skip
    assert code == 0, out
    assert files(config, policy) == before
    assert '+[tenants.initech]\n+issuers = ["airlock-dev"]' in out
    assert "+[tenants.initech.quota]\n+requests_per_second = 5.0" in out
    assert "+g, initech/alice, user, initech" in out
    assert '+models = ["echo"]' in out
    assert "nothing written" in out and "--write" in out


def test_add_then_remove_with_write_round_trips_every_file(
    site: tuple[Path, Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    config, policy, common = site
    before = files(config, policy)
    code, out = run(
        capsys, "tenant", "add", "initech", "--model", "echo", "--admin", "bob", "--write", *common
    )
    assert code == 0, out
    cfg = config_mod.load(config)
    assert cfg.tenants["initech"].models == ("echo",)
    assert "g, initech/bob, tenant-admin, initech" in (policy / "policy.csv").read_text()
    assert run(capsys, "policy", "test", "--dir", str(policy))[0] == 0  # the policy still loads and passes
    (policy / "tests.yaml").write_text(
        (policy / "tests.yaml").read_text()
        + "- {subject: initech/bob, tenant: initech, resource: model:echo, action: generate, expect: allow}\n"
    )
    code, out = run(capsys, "tenant", "remove", "initech", "--write", *common)
    assert code == 0, out
    assert files(config, policy) == before  # the tenant's tables, lines and cases: exactly those


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["add", "acme", "--model", "echo"], "already in"),
        (["add", "initech", "--model", "nope"], "model(s) nope not in"),
        (["add", "initech", "--model", "echo", "--user", "a,b"], "is not a subject"),
        (["remove", "nobody"], "in neither"),
    ],
)
def test_refusals_name_the_problem_and_change_nothing(
    site: tuple[Path, Path, list[str]], capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    config, policy, common = site
    before = files(config, policy)
    code, out = run(capsys, "tenant", *argv, "--write", *common)
    assert code == 2 and message in out
    assert files(config, policy) == before


def test_an_edit_the_policy_would_refuse_is_not_made(site: tuple[Path, Path, list[str]]) -> None:
    config, policy, _ = site
    cfg = config_mod.load(config)
    with pytest.raises(TenantEditError, match="the policy would not load"):
        add_tenant(cfg, policy, "initech", models=["echo"], issuers=["x"], quota={"requests_per_second": -1})
    made = add_tenant(cfg, policy, "initech", models=["echo"], issuers=['a"]\n[tenants.evil'])
    assert '"a\\"]\\n[tenants.evil"' in made[0].after  # escaped: it stays one string


def test_the_built_in_demo_configuration_is_not_edited(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run(capsys, "tenant", "add", "initech", "--model", "smollm2", "--state-dir", str(tmp_path))
    assert code == 2 and "pass --config FILE" in out


def test_list_shows_where_each_tenant_is_known(
    site: tuple[Path, Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, common = site
    code, out = run(capsys, "tenant", "list", *common)
    assert code == 0
    assert "acme" in out and "globex" in out and "no running stack" in out


def test_keys_create_refuses_a_tenant_that_exists_nowhere(
    site: tuple[Path, Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, common = site
    code, out = run(capsys, "keys", "create", "--tenant", "acmee", *common)
    assert code == 2
    assert "tenant 'acmee' is in neither the configuration" in out and "airlock tenant add" in out
    code, out = run(capsys, "keys", "create", "--tenant", "acme", *common)
    assert code == 0 and "created key acme-" in out
