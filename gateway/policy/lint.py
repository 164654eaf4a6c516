"""`airlock policy lint`: mistakes a policy that loads can still hold, found before it ships.

Casbin accepts these lines; a security team almost never means them: tenant patterns that reach
other tenants, grants across tenants, role-name typos, allows a deny hides, role chains Casbin stops
following, loose resource prefixes, duplicates and a `#` a reader takes for a comment. Errors must
not ship; warnings need a person.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gateway.policy.rules import MAX_HOPS, Policy, PolicyError, RoleLink, Rule, key_match, load_policy
from gateway.policy.text import show

__all__ = ["Finding", "Severity", "home_tenant", "is_concrete", "lint", "lint_directory", "lint_errors"]

Severity = Literal["error", "warning"]

_SPIFFE = re.compile(r"spiffe://[^/]+/tenant/(?P<tenant>[^/]+)/svc/[^/]+")
_LOCATED = re.compile(
    r"(?P<file>.*?(?:model\.conf|policy\.csv|tenants\.toml|tests\.yaml))(?::(?P<line>\d+))?: (?P<message>.*)",
    re.DOTALL,
)


@dataclass(frozen=True)
class Finding:
    severity: Severity  # error: must not ship; warning: a person should look at it
    file: str
    line: int  # 0: the file as a whole
    code: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.severity} {self.code}: {self.message}"


def is_concrete(subject: str) -> bool:
    """A user (`TENANT/NAME`) or a service (SPIFFE ID), as opposed to a role name."""
    return "/" in subject or subject.startswith("spiffe://")


def home_tenant(subject: str) -> str | None:
    """The tenant a concrete subject's identity belongs to; None for roles and foreign SPIFFE IDs."""
    if subject.startswith("spiffe://"):
        match = _SPIFFE.fullmatch(subject)
        return match["tenant"] if match else None
    return subject.split("/", 1)[0] if "/" in subject else None


def lint_directory(directory: Path) -> list[Finding]:
    """Load and lint a policy directory; a policy that does not load is one `SYNTAX` error."""
    try:
        policy = load_policy(directory)
    except PolicyError as exc:
        match = _LOCATED.fullmatch(str(exc))
        if match is None:
            return [Finding("error", str(directory), 0, "SYNTAX", str(exc))]
        line = int(match["line"]) if match["line"] else 0
        return [Finding("error", match["file"], line, "SYNTAX", match["message"])]
    return lint(policy)


def lint_errors(policy: Policy) -> list[Finding]:
    """Only the error-level checks (one pass over the lines): what the gateway refuses to serve."""
    return [
        f for f in _tenant_patterns(policy, str(policy.directory / "policy.csv")) if f.severity == "error"
    ]


def lint(policy: Policy) -> list[Finding]:
    csv = str(policy.directory / "policy.csv")
    findings = [
        *_tenant_patterns(policy, csv),
        *_cross_tenant_grants(policy, csv),
        *_unknown_roles(policy, csv),
        *_roles_without_permissions(policy, csv),
        *_shadowed_allows(policy, csv),
        *_role_graph(policy, csv),
        *_prefix_patterns(policy, csv),
        *_duplicates(policy, csv),
        *_hash_in_fields(policy, csv),
        *_casbin_reading(policy, csv),
    ]
    return sorted(findings, key=lambda f: (f.file, f.line, f.code))


def reload_warnings(policy: Policy) -> list[Finding]:
    """The warnings a gateway logs when it puts a policy in service: every check but Casbin's own
    reading (which builds an enforcer), for a policy that has no errors already."""
    csv = str(policy.directory / "policy.csv")
    checks = (_cross_tenant_grants, _unknown_roles, _roles_without_permissions, _shadowed_allows,
              _role_graph, _prefix_patterns, _duplicates, _hash_in_fields)  # fmt: skip
    found = [f for check in checks for f in check(policy, csv) if f.severity == "warning"]
    return sorted(found, key=lambda f: (f.file, f.line, f.code))


def _tenant_patterns(policy: Policy, csv: str) -> Iterator[Finding]:
    for rule in policy.rules:
        if "*" not in rule.tenant:
            continue
        if rule.tenant != "*":
            prefix = rule.tenant[: rule.tenant.find("*")]
            matched = sorted(t for t in policy.tenants if key_match(t, rule.tenant))
            yield Finding(
                "error", csv, rule.line, "TENANT_PATTERN",
                f"tenant pattern {rule.tenant!r} matches tenants {', '.join(matched) or '(none today)'} "
                f"and any tenant added later whose name starts with {prefix!r}; name one tenant, "
                "or '*' for every tenant",
            )  # fmt: skip
        elif is_concrete(rule.subject) and rule.effect == "allow":
            # A deny everywhere can only narrow access; an allow everywhere makes one tenant's
            # identity act in all of them.
            yield Finding(
                "error", csv, rule.line, "CROSS_TENANT_SUBJECT",
                f"{rule.subject!r} is allowed this in every tenant ('*'); '*' lines are for roles. "
                "Grant it by name in each tenant that wants it (a g line in that tenant)",
            )  # fmt: skip


def _cross_tenant_grants(policy: Policy, csv: str) -> Iterator[Finding]:
    for rule in policy.rules:
        home = home_tenant(rule.subject)
        if home is not None and "*" not in rule.tenant and home != rule.tenant and rule.effect == "allow":
            yield Finding(
                "warning", csv, rule.line, "CROSS_TENANT_GRANT",
                f"{rule.subject} (tenant {home}) is allowed {rule.action} on {rule.resource} in tenant "
                f"{rule.tenant}: check that {rule.tenant} means to let {home} act for it",
            )  # fmt: skip
    for link in policy.links:
        home = home_tenant(link.member)
        if home is not None and home != link.tenant:
            yield Finding(
                "warning", csv, link.line, "CROSS_TENANT_GRANT",
                f"{link.member} (tenant {home}) holds role {link.role} in tenant {link.tenant}: "
                f"check that {link.tenant} means to let {home} act for it",
            )  # fmt: skip


def _unknown_roles(policy: Policy, csv: str) -> Iterator[Finding]:
    roles = {link.role for link in policy.links}
    for rule in policy.rules:
        if not is_concrete(rule.subject) and rule.subject not in roles:
            yield Finding(
                "warning", csv, rule.line, "UNKNOWN_ROLE",
                f"{rule.subject!r} is neither a subject (TENANT/NAME or a SPIFFE ID) nor a role any g "
                "line gives out, so this line has no effect; a typo?",
            )  # fmt: skip


def _roles_without_permissions(policy: Policy, csv: str) -> Iterator[Finding]:
    patterns_by_subject: dict[str, list[str]] = defaultdict(list)
    for rule in policy.rules:
        patterns_by_subject[rule.subject].append(rule.tenant)
    members = {(link.tenant, link.member) for link in policy.links}
    seen: set[tuple[str, str]] = set()
    for link in policy.links:
        key = (link.tenant, link.role)
        if key in seen:
            continue
        seen.add(key)
        granted = any(key_match(link.tenant, p) for p in patterns_by_subject.get(link.role, ()))
        if not granted and key not in members:
            yield Finding(
                "warning", csv, link.line, "ROLE_WITHOUT_PERMISSIONS",
                f"role {link.role!r} has no p line in tenant {link.tenant} (nor '*') and no role of "
                "its own, so holding it grants nothing; a typo?",
            )  # fmt: skip


def _covers(pattern: str, other: str) -> bool:
    """Whether every key `other` matches (keyMatch) is also matched by `pattern`."""
    star = pattern.find("*")
    if star == -1:
        return other == pattern
    other_star = other.find("*")
    other_prefix = other if other_star == -1 else other[:other_star]
    return other_prefix.startswith(pattern[:star])


def _shadowed_allows(policy: Policy, csv: str) -> Iterator[Finding]:
    denies: dict[str, list[Rule]] = defaultdict(list)
    for rule in policy.rules:
        if rule.effect == "deny":
            denies[rule.subject].append(rule)
    if not denies:
        return
    for allow in policy.rules:
        if allow.effect != "allow":
            continue
        # Through roles too: an allow to acme/bob in acme is dead if bob's role there is denied it.
        names = [allow.subject]
        if "*" not in allow.tenant:
            names += policy.roles_of(allow.subject, allow.tenant)
        shadow = next(
            (
                d
                for name in names
                for d in denies.get(name, ())
                if _covers(d.tenant, allow.tenant)
                and _covers(d.resource, allow.resource)
                and d.action in ("*", allow.action)
            ),
            None,
        )
        if shadow is not None:
            via = "" if shadow.subject == allow.subject else f" (through role {shadow.subject})"
            yield Finding(
                "warning", csv, allow.line, "SHADOWED_ALLOW",
                f"this allow never takes effect: the deny on line {shadow.line} ({shadow}) covers it"
                f"{via}, and deny overrides allow",
            )  # fmt: skip


def _role_graph(policy: Policy, csv: str) -> Iterator[Finding]:
    edges: dict[str, dict[str, dict[str, RoleLink]]] = defaultdict(lambda: defaultdict(dict))
    for link in policy.links:
        edges[link.tenant][link.member].setdefault(link.role, link)
    for tenant in sorted(edges):
        graph = edges[tenant]
        for cycle in _cycles(graph):
            line = min(graph[a][b].line for a in cycle for b in graph.get(a, {}) if b in cycle)
            yield Finding(
                "warning", csv, line, "ROLE_CYCLE",
                f"roles {', '.join(cycle)} hold each other in a cycle in tenant {tenant}: a member "
                "of any of them holds them all, which is rarely meant",
            )  # fmt: skip
        yield from _too_deep(graph, tenant, csv)


def _too_deep(graph: dict[str, dict[str, RoleLink]], tenant: str, csv: str) -> Iterator[Finding]:
    """Roles a subject reaches only after more hops than Casbin follows (it then doesn't hold them)."""
    roles = {role for targets in graph.values() for role in targets}
    reported: set[int] = set()
    done: set[frozenset[str]] = set()  # subjects with the same direct roles reach the same roles
    for root in graph:
        direct = frozenset(graph[root])
        if root in roles or direct in done:
            continue
        done.add(direct)
        dist = {root: 0}
        frontier = [root]
        for hop in range(1, MAX_HOPS + 2):
            nxt = []
            for name in frontier:
                for role, link in graph.get(name, {}).items():
                    if role in dist:
                        continue
                    dist[role] = hop
                    nxt.append(role)
                    if hop > MAX_HOPS and link.line not in reported:
                        reported.add(link.line)
                        yield Finding(
                            "warning", csv, link.line, "ROLE_DEPTH",
                            f"in tenant {tenant}, {root} reaches role {role} only after {hop} role hops; "
                            f"Casbin follows at most {MAX_HOPS}, so {role} and the roles above it are "
                            "not granted",
                        )  # fmt: skip
            if not nxt:
                break
            frontier = nxt


def _cycles(graph: dict[str, dict[str, RoleLink]]) -> list[list[str]]:
    """The strongly connected parts of the role graph that contain a cycle (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph.get(start, {})))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph.get(child, {}))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                part = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    part.append(member)
                    if member == node:
                        break
                if len(part) > 1 or node in graph.get(node, {}):
                    out.append(part[::-1])
    return out


def _prefix_patterns(policy: Policy, csv: str) -> Iterator[Finding]:
    for rule in policy.rules:
        resource = rule.resource
        star = resource.find("*")
        if star == -1 or resource == "*":
            continue
        prefix = resource[:star]
        if star != len(resource) - 1:
            message = (
                f"resource {resource!r}: everything after the first '*' is ignored, so it matches "
                f"every resource starting with {prefix!r}"
            )
        elif star > 0 and resource[star - 1] in ":/":
            continue
        else:
            message = (
                f"resource {resource!r} also matches any resource starting with {prefix!r} "
                f"(e.g. {prefix}-guard); end a pattern at ':' or '/', or name the resource exactly"
            )
        yield Finding("warning", csv, rule.line, "PREFIX_PATTERN", message)


def _duplicates(policy: Policy, csv: str) -> Iterator[Finding]:
    first: dict[str, int] = {}
    lines: list[Rule | RoleLink] = [*policy.rules, *policy.links]
    for item in sorted(lines, key=lambda i: i.line):
        text = str(item)
        if text in first:
            yield Finding("warning", csv, item.line, "DUPLICATE", f"same as line {first[text]}")
        else:
            first[text] = item.line


def _hash_in_fields(policy: Policy, csv: str) -> Iterator[Finding]:
    """Only a line that starts with `#` is a comment; a `#` later on is part of the value (Casbin's
    reading), which a person reads as a comment: `g, acme/eve, user, acme # until Friday`."""
    lines: list[Rule | RoleLink] = [*policy.rules, *policy.links]
    for item in sorted(lines, key=lambda i: i.line):
        fields = (item.subject, item.resource) if isinstance(item, Rule) else (item.member, item.role)
        field = next((f for f in fields if "#" in f), None)
        if field is not None:
            yield Finding(
                "warning", csv, item.line, "HASH_IN_FIELD",
                f"{show(field)} contains '#': it is part of the value, not a comment (only a line "
                "that starts with '#' is a comment)",
            )  # fmt: skip


def _casbin_reading(policy: Policy, csv: str) -> Iterator[Finding]:
    """Casbin's own file reader must see the very lines Airlock enforces (the grammar ensures it;
    this says so loudly should they ever part)."""
    difference = policy.casbin_reads_differently()
    if difference is not None:
        yield Finding("error", csv, 0, "CASBIN_READS_DIFFERENTLY", f"{difference}; report this as a bug")
