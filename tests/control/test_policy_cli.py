"""`airlock policy lint|test|explain` on the repository's policy and on broken copies of it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from control.cli import main
from gateway.policy.lint import lint
from gateway.policy.rules import load_policy

REPO_POLICY = Path(__file__).resolve().parents[2] / "policy"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["policy", *args])
    out, err = capsys.readouterr()
    return code, out, err


def explain(
    capsys: pytest.CaptureFixture[str], directory: Path, subject: str, tenant: str, resource: str, action: str
) -> tuple[int, str, str]:
    request = ["--subject", subject, "--tenant", tenant, "--resource", resource, "--action", action]
    return run(capsys, "explain", "--dir", str(directory), *request)


def make_policy(tmp_path: Path, lines: str, *, tenants: tuple[str, ...] = ("acme",), cases: str = "") -> Path:
    """A policy directory with Airlock's model, the given tenants, policy.csv lines and cases."""
    directory = tmp_path / "policy"
    directory.mkdir()
    shutil.copy(REPO_POLICY / "model.conf", directory / "model.conf")
    (directory / "tenants.toml").write_text(
        "".join(f'[tenants.{t}]\nissuers = ["airlock-dev"]\n' for t in tenants)
    )
    (directory / "policy.csv").write_text(lines)
    (directory / "tests.yaml").write_text(cases)
    return directory


def copy_repo_policy(tmp_path: Path) -> Path:
    directory = tmp_path / "policy"
    shutil.copytree(REPO_POLICY, directory)
    return directory


def test_repo_policy_lints_clean(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "lint", "--dir", str(REPO_POLICY))
    assert code == 0, out
    assert " error " not in out and "0 error(s)" in out
    assert [f for f in lint(load_policy(REPO_POLICY)) if f.severity == "error"] == []


def test_repo_policy_cases_all_pass(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "test", "--dir", str(REPO_POLICY))
    assert code == 0, out
    cases = len(load_policy(REPO_POLICY).cases)
    assert cases > 0 and f"{cases} passed, 0 failed" in out


def test_default_directory_is_policy_in_the_current_directory(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO_POLICY.parent)
    assert run(capsys, "test")[0] == 0


def test_tenant_prefix_pattern_is_an_error_naming_every_tenant_it_reaches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = make_policy(
        tmp_path,
        "p, user, tenant-1*, model:*, generate, allow\ng, tenant-1/bob, user, tenant-1\n",
        tenants=("tenant-1", "tenant-10", "tenant-2"),
    )
    code, out, _ = run(capsys, "lint", "--dir", str(directory))
    assert code == 1
    [line] = [line for line in out.splitlines() if "TENANT_PATTERN" in line]
    assert line.startswith(f"{directory / 'policy.csv'}:1: error TENANT_PATTERN:")
    assert "tenant-1, tenant-10" in line and "tenant-2" not in line
    assert "1 error(s)" in out


def test_star_tenant_for_a_named_subject_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = make_policy(tmp_path, "p, acme/alice, *, model:*, generate, allow\n")
    code, out, _ = run(capsys, "lint", "--dir", str(directory))
    assert code == 1
    assert f"{directory / 'policy.csv'}:1: error CROSS_TENANT_SUBJECT:" in out


def test_shadowed_allow_is_a_warning_naming_the_deny(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = make_policy(
        tmp_path,
        "p, acme/eve, acme, model:smollm2, generate, allow\np, acme/eve, acme, model:*, *, deny\n",
    )
    code, out, _ = run(capsys, "lint", "--dir", str(directory))
    assert code == 0  # warnings alone pass ...
    [line] = [line for line in out.splitlines() if "SHADOWED_ALLOW" in line]
    assert line.startswith(f"{directory / 'policy.csv'}:1: warning SHADOWED_ALLOW:")
    assert "line 2" in line
    assert run(capsys, "lint", "--strict", "--dir", str(directory))[0] == 1  # ... unless --strict


def test_each_warning_kind_is_found(tmp_path: Path) -> None:
    hops = "".join(f"g, r{i}, r{i + 1}, acme\n" for i in range(1, 11))
    directory = make_policy(
        tmp_path,
        "g, globex/carol, user, acme\n"  # 1 CROSS_TENANT_GRANT
        "p, user, acme, model:*, generate, allow\n"
        "p, usr, acme, model:*, generate, allow\n"  # 3 UNKNOWN_ROLE
        "g, acme/dan, auditor, acme\n"  # 4 ROLE_WITHOUT_PERMISSIONS
        "p, user, acme, model:llama*, stream, allow\n"  # 5 PREFIX_PATTERN
        "p, user, acme, model:*, generate, allow\n"  # 6 DUPLICATE
        "g, c1, c2, acme\ng, c2, c1, acme\n"  # 7-8 ROLE_CYCLE
        "p, c1, acme, models, list, allow\n"
        "g, acme/zed, r1, acme\n"  # 10, then the chain r1..r11 on lines 11-20
        + hops
        + "p, r11, acme, models, list, allow\n",
        tenants=("acme", "globex"),
    )
    found = {(f.line, f.code) for f in lint(load_policy(directory))}
    assert {
        (1, "CROSS_TENANT_GRANT"),
        (3, "UNKNOWN_ROLE"),
        (4, "ROLE_WITHOUT_PERMISSIONS"),
        (5, "PREFIX_PATTERN"),
        (6, "DUPLICATE"),
        (7, "ROLE_CYCLE"),
        (19, "ROLE_DEPTH"),  # r10 is the 10th hop from acme/zed
    } <= found
    assert all(code != "TENANT_PATTERN" for _, code in found)


def test_failing_case_fails_the_run_and_names_the_case(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = copy_repo_policy(tmp_path)
    with (directory / "tests.yaml").open("a") as cases:
        cases.write(
            "- {subject: acme/bob, tenant: acme, resource: admin:policy, action: admin, expect: allow}\n"
        )
    count = len(load_policy(directory).cases)
    code, out, _ = run(capsys, "test", "--dir", str(directory))
    assert code == 1
    assert f"case {count}: acme/bob admin admin:policy in tenant acme: expected allow, got deny" in out
    assert "no rule matched: default deny" in out
    assert f"{count - 1} passed, 1 failed" in out


def test_failing_case_names_the_deciding_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = copy_repo_policy(tmp_path)
    with (directory / "policy.csv").open("a") as lines:
        lines.write("p, user, acme, model:*, *, deny\n")
    code, out, _ = run(capsys, "test", "--dir", str(directory))
    number = len((directory / "policy.csv").read_text().splitlines())
    assert code == 1
    assert f"decided by {directory / 'policy.csv'}:{number}: p, user, acme, model:*, *, deny" in out


def test_explain_an_allowed_request(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = explain(capsys, REPO_POLICY, "acme/bob", "acme", "model:smollm2", "stream")
    assert code == 0
    line = _line_of(REPO_POLICY, "p, user, *, model:*, stream, allow")
    assert "decision: allow" in out
    assert "roles of acme/bob in acme: user" in out
    assert f"decided by: {REPO_POLICY / 'policy.csv'}:{line}: p, user, *, model:*, stream, allow" in out
    assert "casbin: allow (agrees)" in out


def test_explain_a_request_denied_by_a_deny_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = explain(capsys, REPO_POLICY, "acme/mallory", "acme", "model:smollm2", "generate")
    assert code == 0
    line = _line_of(REPO_POLICY, "p, acme/mallory, acme, *, *, deny")
    assert "decision: deny" in out
    assert f"decided by: {REPO_POLICY / 'policy.csv'}:{line}: p, acme/mallory, acme, *, *, deny" in out
    assert "deny overrides allow" in out
    assert "casbin: deny (agrees)" in out


def test_explain_deny_overrides_a_matching_allow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = copy_repo_policy(tmp_path)
    with (directory / "policy.csv").open("a") as lines:
        lines.write("p, acme/bob, acme, model:smollm2, *, deny\n")
    code, out, _ = explain(capsys, directory, "acme/bob", "acme", "model:smollm2", "generate")
    assert code == 0
    assert "decision: deny" in out and "deny overrides allow (1 allow rule(s) also matched)" in out
    assert "p, user, *, model:*, generate, allow  (through role user)" in out


def test_explain_another_tenants_user_is_denied_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = explain(capsys, REPO_POLICY, "acme/bob", "globex", "model:smollm2", "generate")
    assert code == 0
    assert "decision: deny" in out and "matching rules: none" in out
    assert "no rule matched: default deny" in out and "casbin: deny (agrees)" in out


@pytest.mark.parametrize("command", ["test", "explain"])
def test_load_error_exits_2_naming_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    directory = copy_repo_policy(tmp_path)
    with (directory / "policy.csv").open("a") as lines:
        lines.write("p, user, acme, model:*, fly, allow\n")
    number = len((directory / "policy.csv").read_text().splitlines())
    extra = ["--subject", "a/b", "--tenant", "acme", "--resource", "models", "--action", "list"]
    code, out, err = run(capsys, command, "--dir", str(directory), *(extra if command == "explain" else []))
    assert code == 2 and out == ""
    assert err.startswith(f"airlock: policy error: {directory / 'policy.csv'}:{number}:")
    assert "unknown action 'fly'" in err


def test_lint_reports_a_load_error_as_one_syntax_finding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = copy_repo_policy(tmp_path)
    with (directory / "policy.csv").open("a") as lines:
        lines.write("p, user, nowhere, model:*, generate, allow\n")
    number = len((directory / "policy.csv").read_text().splitlines())
    code, out, _ = run(capsys, "lint", "--dir", str(directory))
    assert code == 1
    assert f"{directory / 'policy.csv'}:{number}: error SYNTAX: unknown tenant 'nowhere'" in out


def _line_of(directory: Path, text: str) -> int:
    lines = (directory / "policy.csv").read_text().splitlines()
    return lines.index(text) + 1
