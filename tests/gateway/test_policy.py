"""The policy directory: every refusal naming file, line and reason; the semantics of the bundled
model (roles, deny overrides allow, default deny, `*` tenants); and the `Authorizer` that serves it
(cache, swap, hot reload with its metrics and audit records, the file watcher)."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import AuditLog
from gateway.metrics import Metrics
from gateway.policy import authz
from gateway.policy.authz import Authorizer, load_checked
from gateway.policy.rules import Decision, Policy, PolicyError, load_policy

REPO_POLICY = Path(__file__).resolve().parents[2] / "policy"
GENERATE = ("model:smollm2", "generate")


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policy"
    shutil.copytree(REPO_POLICY, directory)
    return directory


def append(path: Path, *lines: str) -> int:
    """Append lines to a file; return the 1-based number of the first appended line."""
    text = path.read_text()
    if text and not text.endswith("\n"):
        text += "\n"
    first = len(text.splitlines()) + 1
    path.write_text(text + "".join(line + "\n" for line in lines))
    return first


def refused(directory: Path, *, checked: bool = False, required: tuple[str, ...] = ()) -> str:
    with pytest.raises(PolicyError) as info:
        if checked:
            load_checked(directory, required)
        else:
            load_policy(directory)
    return str(info.value)


def allowed(policy: Policy, subject: str, tenant: str, resource: str, action: str) -> bool:
    ours = policy.decide(subject, tenant, resource, action).allowed
    casbin = policy.casbin_enforcer().enforce(subject, tenant, resource, action)
    assert ours == casbin, (subject, tenant, resource, action, ours, casbin)
    return ours


# --- the bundled policy ---------------------------------------------------------------------------


def test_bundled_policy_loads_and_its_cases_pass() -> None:
    policy = load_checked(REPO_POLICY, ["acme", "globex"])
    assert {"acme", "globex"} <= set(policy.tenants)
    assert len(policy.cases) >= 10
    assert policy.failing_cases() == []
    assert policy.rules and policy.links


def test_bundled_cases_agree_with_casbin() -> None:
    policy = load_policy(REPO_POLICY)
    enforcer = policy.casbin_enforcer()
    outcomes = set()
    for case in policy.cases:
        ours = policy.decide(case.subject, case.tenant, case.resource, case.action).allowed
        assert ours == enforcer.enforce(case.subject, case.tenant, case.resource, case.action), case
        assert ours == (case.expect == "allow"), case
        outcomes.add(ours)
    assert outcomes == {True, False}


def test_missing_tests_yaml_means_no_cases(policy_dir: Path) -> None:
    (policy_dir / "tests.yaml").unlink()
    assert load_policy(policy_dir).cases == ()


def test_empty_tests_yaml_means_no_cases(policy_dir: Path) -> None:
    (policy_dir / "tests.yaml").write_text("# nothing yet\n")
    assert load_policy(policy_dir).cases == ()


# --- refusals: missing files and the model ---------------------------------------------------------


@pytest.mark.parametrize("name", ["model.conf", "policy.csv", "tenants.toml"])
def test_missing_file(policy_dir: Path, name: str) -> None:
    (policy_dir / name).unlink()
    message = refused(policy_dir)
    assert str(policy_dir / name) in message
    assert "missing" in message


def test_missing_directory(tmp_path: Path) -> None:
    message = refused(tmp_path / "nowhere")
    assert "missing" in message


def test_unreadable_policy_file(policy_dir: Path) -> None:
    (policy_dir / "policy.csv").write_bytes(b"p, \xff\xfe, acme, *, *, allow\n")
    message = refused(policy_dir)
    assert str(policy_dir / "policy.csv") in message
    assert "cannot read" in message


def edit_model(directory: Path, old: str, new: str) -> None:
    path = directory / "model.conf"
    text = path.read_text()
    assert old in text  # the edit must really happen, or the test passes vacuously
    path.write_text(text.replace(old, new))


@pytest.mark.parametrize(
    ("old", "new", "section"),
    [
        # effect: Casbin's built-in deny-override (allow unless denied: no default deny)
        (
            "e = some(where (p.eft == allow)) && !some(where (p.eft == deny))",
            "e = !some(where (p.eft == deny))",
            "[e] e",
        ),
        # effect: allow-override
        (
            "e = some(where (p.eft == allow)) && !some(where (p.eft == deny))",
            "e = some(where (p.eft == allow))",
            "[e] e",
        ),
        # matcher: the tenant no longer matters
        ("g(r.sub, p.sub, r.dom) && keyMatch(r.dom, p.dom) && ", "g(r.sub, p.sub, r.dom) && ", "[m] m"),
        # matcher: resources matched with a regex instead of keyMatch
        ("keyMatch(r.obj, p.obj)", "regexMatch(r.obj, p.obj)", "[m] m"),
        # matcher: an extra way in
        ('p.act == "*")', 'p.act == "*") || r.sub == "root"', "[m] m"),
        # request and policy definitions
        ("r = sub, dom, obj, act", "r = sub, dom, obj, act, ip", "[r] r"),
        ("p = sub, dom, obj, act, eft", "p = sub, dom, obj, act, eft, prio", "[p] p"),
        # roles without tenants
        ("g = _, _, _", "g = _, _", "[g] g"),
    ],
)
def test_model_that_differs_is_refused(policy_dir: Path, old: str, new: str, section: str) -> None:
    edit_model(policy_dir, old, new)
    message = refused(policy_dir)
    assert str(policy_dir / "model.conf") in message
    assert section in message
    assert "differs" in message


def test_model_reformatted_is_accepted(policy_dir: Path) -> None:
    # Whitespace and Casbin's own p_eft spelling are not differences.
    edit_model(
        policy_dir,
        "e = some(where (p.eft == allow)) && !some(where (p.eft == deny))",
        "e = some(where (p_eft == allow)) && !some(where (p_eft == deny))",
    )
    edit_model(policy_dir, "r = sub, dom, obj, act", "r = sub,dom,obj,act")
    assert load_policy(policy_dir).rules


def test_model_that_is_not_casbin_is_refused(policy_dir: Path) -> None:
    (policy_dir / "model.conf").write_text("[request_definition\nr = sub\n")
    message = refused(policy_dir)
    assert str(policy_dir / "model.conf") in message


def test_model_without_a_section_is_refused(policy_dir: Path) -> None:
    text = (policy_dir / "model.conf").read_text()
    start = text.index("[role_definition]")
    end = text.index("[policy_effect]")
    (policy_dir / "model.conf").write_text(text[:start] + text[end:])
    message = refused(policy_dir)
    assert "[g] g differs" in message


# --- refusals: policy.csv -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("p, acme/bob, acme, model:*, generate", "a p line has 5 fields"),
        ("p, acme/bob, acme, model:*, generate, allow, extra", "a p line has 5 fields"),
        ("p, acme/bob", "a p line has 5 fields"),
        ("g, acme/bob, user", "a g line has 3 fields"),
        ("g, acme/bob, user, acme, extra", "a g line has 3 fields"),
        ("p, acme/bob, acme, model:*, delete, allow", "unknown action 'delete'"),
        ("p, acme/bob, acme, model:*, Generate, allow", "unknown action 'Generate'"),
        ("p, acme/bob, acme, model:*, generate, permit", "effect must be allow or deny, got 'permit'"),
        ("p, acme/bob, acme, model:*, generate, Allow", "effect must be allow or deny"),
        ("p, acme/bob, initech, model:*, generate, allow", "unknown tenant 'initech'"),
        ("g, acme/bob, user, initech", "unknown tenant 'initech'"),
        ("p, *, acme, model:*, generate, allow", "'*' is not allowed"),
        ("p, acme/*, acme, model:*, generate, allow", "'*' is not allowed"),
        ("g, *, user, acme", "'*' is not allowed"),
        ("g, acme/bob, *, acme", "'*' is not allowed"),
        ("g, acme/bob, admin*, acme", "'*' is not allowed"),
        ("g, acme/bob, user, *", "role lines name one tenant"),
        ("g, acme/bob, user, ac*", "role lines name one tenant"),
        ("p, acme/bob, , model:*, generate, allow", "empty field"),
        ("g, acme/bob, , acme", "empty field"),
        (",,,", "empty field"),  # pycasbin's file reader fails on it (IndexError)
        ("g, acme/bob, user, acme,", "empty field"),
        ("x, acme/bob, user, acme", "lines start with p or g, got 'x'"),
        ("p2, acme/bob, acme, model:*, generate, allow", "lines start with p or g, got 'p2'"),
    ],
)
def test_bad_policy_line_names_file_and_line(policy_dir: Path, line: str, reason: str) -> None:
    path = policy_dir / "policy.csv"
    number = append(path, "# a comment before the bad line", "", line, "g, acme/zed, user, acme")
    message = refused(policy_dir)
    assert message.startswith(f"{path}:{number + 2}: "), message
    assert reason in message


def test_good_lines_after_a_comment_are_accepted(policy_dir: Path) -> None:
    before = load_policy(policy_dir)
    append(policy_dir / "policy.csv", "   # indented comment", " \t ", "g, acme/zed, user, acme")
    after = load_policy(policy_dir)
    assert len(after.links) == len(before.links) + 1
    assert after.links[-1].member == "acme/zed"


def test_line_numbers_recorded(policy_dir: Path) -> None:
    path = policy_dir / "policy.csv"
    number = append(path, "p, acme/zed, acme, model:x, list, allow", "g, acme/zed, user, globex")
    policy = load_policy(policy_dir)
    assert policy.rules[-1].line == number
    assert str(policy.rules[-1]) == "p, acme/zed, acme, model:x, list, allow"
    assert policy.links[-1].line == number + 1
    assert str(policy.links[-1]) == "g, acme/zed, user, globex"


def test_tenant_patterns_accepted_in_p_lines(policy_dir: Path) -> None:
    append(policy_dir / "policy.csv", "p, auditor, glo*, models, list, allow")
    assert load_policy(policy_dir).rules[-1].tenant == "glo*"


# --- refusals: tenants.toml -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[tenants.acme\n", "not valid TOML"),
        ('[tenants.acme]\nissuers = ["a"]\n[gateway]\nx = 1\n', "unknown key 'gateway'"),
        ("# no tenants\n", "must define at least one [tenants.NAME] table"),
        ("tenants = 3\n", "must define at least one [tenants.NAME] table"),
        ('[tenants.Acme]\nissuers = ["a"]\n', "tenants.Acme: tenant names are lowercase"),
        ('[tenants."acme/x"]\nissuers = ["a"]\n', "tenant names are lowercase"),
        ('[tenants."-acme"]\nissuers = ["a"]\n', "tenant names are lowercase"),
        ('[tenants.acme]\nissuers = ["a"]\nmodels = ["x"]\n', "tenants.acme: only 'issuers', 'quota'"),
        ('[tenants]\nacme = "yes"\n', "tenants.acme: only 'issuers', 'quota', 'attestation' and 'isolation'"),
        ('[tenants.acme]\nissuers = ["a"]\nisolation = "share"\n', 'acme.isolation: must be "dedicated"'),
        ('[tenants.acme]\nissuers = ["a"]\nisolation = true\n', 'acme.isolation: must be "dedicated"'),
        ('[tenants.acme]\nissuers = "airlock-dev"\n', "tenants.acme.issuers: must be a list"),
        ('[tenants.acme]\nissuers = ["ok", ""]\n', "tenants.acme.issuers: must be a list"),
        ("[tenants.acme]\nissuers = [1]\n", "tenants.acme.issuers: must be a list"),
    ],
)
def test_bad_tenants_toml(policy_dir: Path, text: str, reason: str) -> None:
    path = policy_dir / "tenants.toml"
    path.write_text(text)
    message = refused(policy_dir)
    assert message.startswith(f"{path}: "), message
    assert reason in message


def test_tenant_settings_loaded(policy_dir: Path) -> None:
    (policy_dir / "tenants.toml").write_text(
        '[tenants.acme]\nissuers = ["a", "b"]\n[tenants.globex]\n[tenants.x-1]\nissuers = []\n'
    )
    tenants = load_policy(policy_dir).tenants
    assert tenants["acme"].issuers == ("a", "b")
    assert tenants["globex"].issuers == ()
    assert tenants["x-1"].name == "x-1"


# --- refusals: tests.yaml and load_checked --------------------------------------------------------

CASE = "{subject: acme/bob, tenant: acme, resource: model:x, action: generate, expect: allow}"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("- [unclosed\n", "not valid YAML"),
        ("subject: acme/bob\n", "must be a list of cases"),
        ("just a string\n", "must be a list of cases"),
        (f"- {CASE}\n- [a, b]\n", "case 2: needs exactly action, expect, resource, subject, tenant"),
        ("- {subject: acme/bob, tenant: acme, resource: model:x, action: generate}\n", "case 1: needs"),
        (f"- {CASE[:-1]}, why: because}}\n", "case 1: needs exactly"),
        (f"- {CASE.replace('allow', 'yes')}\n", "case 1: string values; expect is allow or deny"),
        (f"- {CASE.replace('acme/bob', '42')}\n", "case 1: string values"),
        (f"- {CASE}\n- {CASE.replace('tenant: acme', 'tenant: acmee')}\n", "case 2: unknown tenant 'acmee'"),
        ("- " + CASE.replace("generate", '"*"') + "\n", "case 1: action must be one of generate, stream"),
        (f"- {CASE.replace('generate', 'delete')}\n", "case 1: action must be one of"),
    ],
)
def test_bad_tests_yaml(policy_dir: Path, text: str, reason: str) -> None:
    path = policy_dir / "tests.yaml"
    path.write_text(text)
    message = refused(policy_dir)
    assert message.startswith(f"{path}: "), message
    assert reason in message


def test_failing_case_refused_by_load_checked(policy_dir: Path) -> None:
    path = policy_dir / "tests.yaml"
    count = len(load_policy(policy_dir).cases)
    append(path, "- {subject: acme/bob, tenant: acme, resource: admin:policy, action: admin, expect: allow}")
    policy = load_policy(policy_dir)  # the plain loader does not run the cases
    assert [c.index for c, _ in policy.failing_cases()] == [count + 1]
    message = refused(policy_dir, checked=True)
    assert message.startswith(f"{path}: 1 case(s) fail; case {count + 1} "), message
    assert "acme/bob admin admin:policy in acme" in message
    assert "expects allow, got deny" in message


def test_policy_edit_that_breaks_a_case_is_refused(policy_dir: Path) -> None:
    append(policy_dir / "policy.csv", "p, user, acme, model:*, stream, deny")
    message = refused(policy_dir, checked=True)
    assert "tests.yaml: 1 case(s) fail" in message
    assert "acme/bob stream model:smollm2 in acme) expects allow, got deny" in message


@pytest.mark.parametrize(
    ("line", "code"),
    [
        ("p, user, glo*, model:*, list, allow", "TENANT_PATTERN"),
        ("p, acme/bob, *, model:*, list, allow", "CROSS_TENANT_SUBJECT"),
    ],
)
def test_lint_error_refused_by_load_checked(policy_dir: Path, line: str, code: str) -> None:
    path = policy_dir / "policy.csv"
    number = append(path, line)
    assert load_policy(policy_dir).rules[-1].line == number  # it loads; only the check refuses it
    message = refused(policy_dir, checked=True)
    assert message.startswith("1 lint error(s); first: "), message
    assert f"{path}:{number}: error {code}: " in message


def test_served_tenant_missing(policy_dir: Path) -> None:
    message = refused(policy_dir, checked=True, required=("acme", "initech", "globex", "hooli"))
    assert message == f"{policy_dir / 'tenants.toml'}: served tenants missing: hooli, initech"
    assert load_checked(policy_dir, ("acme", "globex")).tenants


# --- semantics ------------------------------------------------------------------------------------


def test_role_inherits_role(policy_dir: Path) -> None:
    append(
        policy_dir / "policy.csv",
        "g, acme/dave, intern, acme",
        "g, intern, junior, acme",
        "g, junior, user, acme",
        "p, junior, acme, model:tiny, list, allow",
    )
    policy = load_policy(policy_dir)
    assert policy.roles_of("acme/dave", "acme") == ("intern", "junior", "user")
    assert policy.roles_of("acme/dave", "globex") == ()
    assert allowed(policy, "acme/dave", "acme", *GENERATE)  # user's rule, two roles up
    assert allowed(policy, "acme/dave", "acme", "model:tiny", "list")  # junior's rule
    assert not allowed(policy, "acme/dave", "acme", "admin:policy", "admin")
    assert not allowed(policy, "acme/dave", "globex", *GENERATE)  # roles are per tenant
    decision = policy.decide("acme/dave", "acme", *GENERATE)
    assert decision.rule is not None
    assert (decision.rule.subject, decision.rule.tenant) == ("user", "*")


def test_role_chain_stops_after_nine_hops_as_casbin_does(policy_dir: Path) -> None:
    chain = [f"level{i}" for i in range(1, 13)]
    lines = ["g, acme/deep, level1, acme"]
    lines += [f"g, {a}, {b}, acme" for a, b in itertools.pairwise(chain)]
    lines += [f"p, {role}, acme, model:{role}, generate, allow" for role in chain]
    append(policy_dir / "policy.csv", *lines)
    policy = load_policy(policy_dir)
    reach = [allowed(policy, "acme/deep", "acme", f"model:{role}", "generate") for role in chain]
    assert reach == [True] * 9 + [False] * 3
    assert policy.roles_of("acme/deep", "acme") == tuple(chain[:9])
    # From level1, the limit counts from level1.
    assert allowed(policy, "level1", "acme", "model:level10", "generate")
    assert not allowed(policy, "level1", "acme", "model:level11", "generate")


def test_role_cycle_terminates(policy_dir: Path) -> None:
    append(
        policy_dir / "policy.csv",
        "g, acme/eve, ring-a, acme",
        "g, ring-a, ring-b, acme",
        "g, ring-b, ring-a, acme",
        "g, ring-b, acme/eve, acme",
        "p, ring-b, acme, model:ring, generate, allow",
    )
    policy = load_policy(policy_dir)
    assert policy.roles_of("acme/eve", "acme") == ("ring-a", "ring-b")
    assert allowed(policy, "acme/eve", "acme", "model:ring", "generate")
    assert allowed(policy, "ring-a", "acme", "model:ring", "generate")
    assert not allowed(policy, "acme/eve", "acme", "model:ring", "stream")


def test_deny_overrides_allow(policy_dir: Path) -> None:
    append(policy_dir / "policy.csv", "g, acme/mallory, tenant-admin, acme")
    policy = load_policy(policy_dir)
    decision = policy.decide("acme/mallory", "acme", *GENERATE)
    assert not decision.allowed
    assert decision.rule is not None and decision.rule.effect == "deny"
    assert {r.effect for r in decision.matched} == {"allow", "deny"}  # the allow matched too, and lost
    assert not allowed(policy, "acme/mallory", "acme", *GENERATE)
    assert not allowed(policy, "acme/mallory", "acme", "admin:policy", "admin")
    # The deny is mallory's own; the role still works for others.
    assert allowed(policy, "acme/alice", "acme", "admin:policy", "admin")


def test_deny_on_a_role_overrides_allow_on_a_subject(policy_dir: Path) -> None:
    append(
        policy_dir / "policy.csv",
        "p, acme/bob, acme, model:secret, generate, allow",
        "p, user, acme, model:secret, *, deny",
    )
    policy = load_policy(policy_dir)
    assert not allowed(policy, "acme/bob", "acme", "model:secret", "generate")
    assert allowed(policy, "acme/bob", "acme", "model:other", "generate")


def test_default_deny(policy_dir: Path) -> None:
    policy = load_policy(policy_dir)
    decision = policy.decide("acme/nobody", "acme", *GENERATE)
    assert decision == Decision(False, None, (), ())
    assert not allowed(policy, "acme/nobody", "acme", *GENERATE)
    assert not allowed(policy, "acme/bob", "acme", "model:smollm2", "admin")  # no rule for the action
    assert not allowed(policy, "acme/bob", "nowhere", *GENERATE)  # unknown tenant


def test_star_tenant_rule_applies_to_every_tenant(policy_dir: Path) -> None:
    with (policy_dir / "tenants.toml").open("a") as fh:
        fh.write('\n[tenants.initech]\nissuers = ["airlock-dev"]\n')
    append(policy_dir / "policy.csv", "g, initech/peter, user, initech", "g, globex/dan, service, globex")
    policy = load_policy(policy_dir)
    for subject, tenant in (("initech/peter", "initech"), ("acme/bob", "acme"), ("globex/demo", "globex")):
        decision = policy.decide(subject, tenant, *GENERATE)
        assert decision.allowed, (subject, tenant)
        assert decision.rule is not None and decision.rule.tenant == "*"
        assert allowed(policy, subject, tenant, *GENERATE)
    assert allowed(policy, "globex/dan", "globex", *GENERATE)
    assert not allowed(policy, "globex/dan", "globex", "model:smollm2", "stream")


def test_tenant_prefix_pattern(policy_dir: Path) -> None:
    append(policy_dir / "policy.csv", "p, acme/bob, ac*, model:*, list, allow")
    policy = load_policy(policy_dir)
    assert allowed(policy, "acme/bob", "acme", "model:x", "list")
    assert not allowed(policy, "acme/bob", "globex", "model:x", "list")


def test_resource_and_action_wildcards(policy_dir: Path) -> None:
    append(policy_dir / "policy.csv", "p, acme/bob, acme, admin:usage*, *, allow")
    policy = load_policy(policy_dir)
    assert allowed(policy, "acme/bob", "acme", "admin:usage", "admin")
    assert allowed(policy, "acme/bob", "acme", "admin:usage/today", "list")
    assert not allowed(policy, "acme/bob", "acme", "admin:policy", "admin")
    assert not allowed(policy, "acme/bob", "acme", "model:smollm2", "admin")


# --- Authorizer -----------------------------------------------------------------------------------


def counting(policy: Policy) -> list[tuple[str, str, str, str]]:
    """Count the calls that reach `policy.decide` (that is: cache misses)."""
    calls: list[tuple[str, str, str, str]] = []
    real = policy.decide

    def spy(subject: str, tenant: str, resource: str, action: str) -> Decision:
        calls.append((subject, tenant, resource, action))
        return real(subject, tenant, resource, action)

    policy.decide = spy  # type: ignore[method-assign]
    return calls


def reloads(authorizer: Authorizer, result: str) -> float:
    value = authorizer.metrics.registry.get_sample_value("airlock_policy_reloads_total", {"result": result})
    return value or 0.0


def generation_gauge(authorizer: Authorizer) -> float | None:
    return authorizer.metrics.registry.get_sample_value("airlock_policy_generation")


def audit_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditLog]:
    log = AuditLog(tmp_path / "audit" / "audit.jsonl")
    yield log
    log.close()


def test_cache_returns_the_same_decision(policy_dir: Path) -> None:
    policy = load_checked(policy_dir)
    calls = counting(policy)
    authorizer = Authorizer(policy)
    first = authorizer.decide("acme/bob", "acme", *GENERATE)
    assert first.allowed
    assert authorizer.decide("acme/bob", "acme", *GENERATE) is first
    denied = authorizer.decide("acme/bob", "globex", *GENERATE)
    assert not denied.allowed
    assert authorizer.decide("acme/bob", "globex", *GENERATE) is denied
    assert calls == [("acme/bob", "acme", *GENERATE), ("acme/bob", "globex", *GENERATE)]


def test_cache_is_bounded(policy_dir: Path) -> None:
    policy = load_checked(policy_dir)
    calls = counting(policy)
    authorizer = Authorizer(policy, cache_size=2)
    for subject in ("acme/bob", "acme/alice", "acme/demo", "acme/bob"):
        assert authorizer.decide(subject, "acme", *GENERATE).allowed
    # The third distinct key cleared the full cache, so bob's second call missed again.
    assert [c[0] for c in calls] == ["acme/bob", "acme/alice", "acme/demo", "acme/bob"]


def test_swap_bumps_generation_and_clears_cache(policy_dir: Path) -> None:
    authorizer = Authorizer(load_checked(policy_dir))
    assert authorizer.generation == 1
    assert generation_gauge(authorizer) == 1
    assert authorizer.decide("acme/bob", "acme", *GENERATE).allowed
    append(policy_dir / "policy.csv", "p, acme/bob, acme, model:*, generate, deny")
    new = load_policy(policy_dir)
    calls = counting(new)
    assert authorizer.swap(new) == 2
    assert authorizer.generation == 2
    assert authorizer.policy is new
    assert generation_gauge(authorizer) == 2
    assert not authorizer.decide("acme/bob", "acme", *GENERATE).allowed  # not the cached allow
    assert calls == [("acme/bob", "acme", *GENERATE)]


def test_from_directory_requires_served_tenants(policy_dir: Path) -> None:
    with pytest.raises(PolicyError, match="served tenants missing: initech"):
        Authorizer.from_directory(policy_dir, required_tenants=["acme", "initech"])
    authorizer = Authorizer.from_directory(policy_dir, required_tenants=["acme"])
    assert authorizer.required_tenants == ("acme",)
    assert authorizer.policy.directory == policy_dir


async def test_reload_accepts_a_valid_edit(policy_dir: Path, audit: AuditLog, tmp_path: Path) -> None:
    authorizer = Authorizer.from_directory(policy_dir, audit=audit)
    assert authorizer.decide("acme/bob", "acme", *GENERATE).allowed
    old = authorizer.policy
    append(
        policy_dir / "policy.csv",
        "p, acme/bob, acme, model:*, generate, deny",
        "g, acme/zed, user, acme",
        "g, acme/zoe, user, acme",
        "g, acme/zia, user, acme",
    )
    assert await authorizer.reload() is True
    assert authorizer.generation == 2
    assert authorizer.policy is not old
    assert not authorizer.decide("acme/bob", "acme", *GENERATE).allowed
    assert reloads(authorizer, "accepted") == 1
    assert reloads(authorizer, "rejected") == 0
    assert generation_gauge(authorizer) == 2
    [record] = audit_records(tmp_path / "audit" / "audit.jsonl")
    assert record["event"] == "policy_reload"
    assert record["result"] == "accepted"
    assert record["generation"] == 2
    assert record["rules"] == len(authorizer.policy.rules) == len(old.rules) + 1
    assert record["links"] == len(authorizer.policy.links) == len(old.links) + 3
    assert record["rules"] != record["links"]  # each count is really its own


async def test_a_retired_policy_is_freed_and_one_still_in_use_is_left_whole(
    policy_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload frees the old generation a piece at a time in a thread (a 100k-line policy freed at
    once holds the GIL ~30 ms); a call that read the old policy before the swap keeps it whole."""
    taken: list[int] = []
    take_apart = Policy.take_apart
    monkeypatch.setattr(Policy, "take_apart", lambda self: taken.append(id(self)) or take_apart(self))
    authorizer = Authorizer.from_directory(policy_dir)
    in_use = authorizer.policy
    rules, links, tenants = in_use.rules, in_use.links, dict(in_use.tenants)
    append(policy_dir / "policy.csv", "g, acme/zed, user, acme")
    assert await authorizer.reload() is True
    assert (in_use.rules, in_use.links, in_use.tenants) == (rules, links, tenants)
    assert in_use.decide("acme/bob", "acme", *GENERATE).allowed
    assert taken == []

    retired = weakref.ref(authorizer.policy)
    retired_id = id(authorizer.policy)
    append(policy_dir / "policy.csv", "g, acme/zoe, user, acme")
    assert await authorizer.reload() is True
    assert retired() is None and taken == [retired_id]
    assert authorizer.decide("acme/zoe", "acme", *GENERATE).allowed


BREAKAGES: dict[str, Callable[[Path], object]] = {
    "bad line": lambda d: (d / "policy.csv").write_text("p, acme/bob, acme, model:*, generate\n"),
    "bad model": lambda d: edit_model(d, "&& !some(where (p.eft == deny))", ""),
    "missing csv": lambda d: (d / "policy.csv").unlink(),
    "failing case": lambda d: (d / "policy.csv").write_text("p, acme/bob, acme, *, *, deny\n"),
    "served tenant dropped": lambda d: (d / "tenants.toml").write_text('[tenants.acme]\nissuers = ["x"]\n'),
    "bad tests.yaml": lambda d: (d / "tests.yaml").write_text("- [unclosed\n"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
async def test_reload_of_a_broken_policy_keeps_the_old_one(
    policy_dir: Path, audit: AuditLog, tmp_path: Path, breakage: str
) -> None:
    authorizer = Authorizer.from_directory(policy_dir, required_tenants=["acme", "globex"], audit=audit)
    requests = [
        ("acme/bob", "acme", *GENERATE),
        ("acme/alice", "acme", "admin:policy", "admin"),
        ("acme/mallory", "acme", *GENERATE),
        ("globex/carol", "acme", *GENERATE),
    ]
    before = [authorizer.decide(*r).allowed for r in requests]
    assert before == [True, True, False, False]
    old = authorizer.policy
    BREAKAGES[breakage](policy_dir)
    with pytest.raises(PolicyError):  # the edit really is refused, by itself
        load_checked(policy_dir, ("acme", "globex"))
    assert await authorizer.reload() is False
    assert authorizer.generation == 1
    assert authorizer.policy is old
    assert generation_gauge(authorizer) == 1
    assert [authorizer.decide(*r).allowed for r in requests] == before
    assert reloads(authorizer, "rejected") == 1
    assert reloads(authorizer, "accepted") == 0
    [record] = audit_records(tmp_path / "audit" / "audit.jsonl")
    assert record["event"] == "policy_reload"
    assert record["result"] == "rejected"
    assert record["generation"] == 1
    assert str(policy_dir) in record["reason"]


async def test_reload_rejected_then_fixed(policy_dir: Path, audit: AuditLog, tmp_path: Path) -> None:
    authorizer = Authorizer.from_directory(policy_dir, audit=audit)
    good = (policy_dir / "policy.csv").read_text()
    number = append(policy_dir / "policy.csv", "p, acme/bob, acme, model:*, fly, allow")
    assert await authorizer.reload() is False
    assert await authorizer.reload() is False
    (policy_dir / "policy.csv").write_text(good + "g, acme/zed, user, acme\n")
    assert await authorizer.reload() is True
    assert authorizer.generation == 2
    assert authorizer.decide("acme/zed", "acme", *GENERATE).allowed
    assert reloads(authorizer, "rejected") == 2
    assert reloads(authorizer, "accepted") == 1
    records = audit_records(tmp_path / "audit" / "audit.jsonl")
    outcomes = [(r["result"], r["generation"]) for r in records]
    assert outcomes == [("rejected", 1), ("rejected", 1), ("accepted", 2)]
    assert f"policy.csv:{number}: unknown action 'fly'" in records[0]["reason"]


async def test_concurrent_reloads_are_serialised(policy_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    authorizer = Authorizer.from_directory(policy_dir)
    lock = threading.Lock()
    in_flight = [0]
    most = [0]

    def slow_load(directory: Path, required: tuple[str, ...]) -> Policy:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(0.05)  # long enough for the other reloads to start, were they not serialised
        try:
            return load_checked(directory, required)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(authz, "load_checked", slow_load)
    results = await asyncio.gather(*(authorizer.reload() for _ in range(5)))
    assert results == [True] * 5
    assert most[0] == 1
    assert authorizer.generation == 6
    assert reloads(authorizer, "accepted") == 5


async def test_watch_picks_up_an_edit(policy_dir: Path, audit: AuditLog, tmp_path: Path) -> None:
    authorizer = Authorizer.from_directory(policy_dir, metrics=Metrics(), audit=audit)
    assert not authorizer.decide("acme/zed", "acme", *GENERATE).allowed
    stop = asyncio.Event()
    watcher = asyncio.create_task(authorizer.watch(stop, debounce_ms=50))
    try:
        await asyncio.sleep(0.3)  # let the watcher start
        path = policy_dir / "policy.csv"
        edited = path.read_text() + "g, acme/zed, user, acme\n"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        next_write = loop.time()
        while authorizer.generation == 1 and loop.time() < deadline:
            if loop.time() >= next_write:  # write again in case the watcher was not ready yet
                path.write_text(edited)
                next_write = loop.time() + 2
            await asyncio.sleep(0.05)
        assert authorizer.generation >= 2, "the watcher did not reload within 10 s"
        assert authorizer.decide("acme/zed", "acme", *GENERATE).allowed
        assert reloads(authorizer, "accepted") >= 1
        assert reloads(authorizer, "rejected") == 0
    finally:
        stop.set()
        await asyncio.wait_for(watcher, timeout=10)
    assert watcher.done() and watcher.exception() is None
    records = audit_records(tmp_path / "audit" / "audit.jsonl")
    assert records and all(r["result"] == "accepted" for r in records)
