"""`airlock policy lint|test|explain`: the security team's checks of a policy directory, offline."""

from __future__ import annotations

import argparse
from pathlib import Path

from control.cli.output import err as _err
from gateway.policy.lint import home_tenant, lint_directory
from gateway.policy.rules import Decision, Policy, PolicyError, Rule, load_policy

__all__ = ["cmd_policy_explain", "cmd_policy_lint", "cmd_policy_test"]


def _load_policy(directory: Path) -> Policy | None:
    try:
        return load_policy(directory)
    except PolicyError as exc:
        _err(f"policy error: {exc}")
        return None


def _where(policy: Policy, rule: Rule) -> str:
    return f"{policy.directory / 'policy.csv'}:{rule.line}: {rule}"


def _why(decision: Decision) -> str:
    if decision.rule is None:
        return "no rule matched: default deny"
    if decision.allowed:
        return "an allow matched and no deny did"
    allows = sum(r.effect == "allow" for r in decision.matched)
    if allows:
        return f"deny overrides allow ({allows} allow rule(s) also matched)"
    return "an explicit deny matched (deny overrides allow)"


def _directory(args: argparse.Namespace) -> Path:
    """--dir, else the configuration's policy_dir: this installation's policy/, as the gateway's."""
    if args.dir is not None:
        return Path(args.dir)
    from gateway import config as config_mod

    return config_mod.load(args.config, state_dir=args.state_dir).policy_dir


def cmd_policy_lint(args: argparse.Namespace) -> int:
    args.dir = _directory(args)
    findings = lint_directory(args.dir)
    for finding in findings:
        print(finding)
    errors = sum(f.severity == "error" for f in findings)
    warnings = len(findings) - errors
    failed = errors > 0 or (args.strict and warnings > 0)
    print(f"{args.dir}: {errors} error(s), {warnings} warning(s){' (--strict)' if args.strict else ''}")
    return 1 if failed else 0


def cmd_policy_test(args: argparse.Namespace) -> int:
    policy = _load_policy(_directory(args))
    if policy is None:
        return 2
    failing = policy.failing_cases()
    tests = policy.directory / "tests.yaml"
    for case, decision in failing:
        got = "allow" if decision.allowed else "deny"
        rule = _where(policy, decision.rule) if decision.rule else "no rule matched: default deny"
        roles = ", ".join(decision.roles) or "none"
        print(
            f"FAIL {tests} case {case.index}: {case.subject} {case.action} {case.resource} in tenant "
            f"{case.tenant}: expected {case.expect}, got {got}\n"
            f"     decided by {rule}\n     roles of {case.subject} in {case.tenant}: {roles}"
        )
    if not policy.cases:
        _err(f"warning: {tests} has no cases")
    print(f"{tests}: {len(policy.cases) - len(failing)} passed, {len(failing)} failed")
    return 1 if failing else 0


def cmd_policy_explain(args: argparse.Namespace) -> int:
    policy = _load_policy(_directory(args))
    if policy is None:
        return 2
    subject, tenant, resource, action = args.subject, args.tenant, args.resource, args.action
    decision = policy.decide(subject, tenant, resource, action)
    verdict = "allow" if decision.allowed else "deny"
    print(f"request: {subject} {action} {resource} in tenant {tenant}")
    print(f"decision: {verdict}")
    if tenant not in policy.tenants:
        print(f"note: tenant {tenant!r} is not in {policy.directory / 'tenants.toml'}")
    print(f"roles of {subject} in {tenant}: {', '.join(decision.roles) or 'none'}")
    home = home_tenant(subject)
    if home is not None and home != tenant and not decision.roles:
        print(f"note: {subject} belongs to tenant {home}; acting in {tenant} needs a g line in {tenant}")
    print("matching rules:" if decision.matched else "matching rules: none")
    for rule in decision.matched:
        via = "" if rule.subject == subject else f"  (through role {rule.subject})"
        print(f"  {_where(policy, rule)}{via}")
    decided = _where(policy, decision.rule) if decision.rule else "default deny (no line)"
    print(f"decided by: {decided}")
    print(f"why: {_why(decision)}")
    difference = policy.casbin_reads_differently()  # the cross-check below means nothing otherwise
    if difference is not None:
        print(
            f"WARNING: CASBIN READS policy.csv DIFFERENTLY: {difference}. Report this as a bug.", flush=True
        )
        _err("policy explain: Casbin's reading of policy.csv and Airlock's differ")
        return 1
    casbin_allows = bool(policy.casbin_enforcer().enforce(subject, tenant, resource, action))
    if casbin_allows == decision.allowed:
        print(f"casbin: {verdict} (agrees)")
        return 0
    print(
        f"WARNING: CASBIN DISAGREES: Casbin answers {'allow' if casbin_allows else 'deny'}, Airlock "
        f"decides {verdict}. The gateway serves Airlock's answer; report this as a bug.",
        flush=True,
    )
    _err("policy explain: Airlock's decision and Casbin's differ")
    return 1
