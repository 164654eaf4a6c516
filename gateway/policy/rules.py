"""The security team's policy directory, loaded, validated and compiled for the request path.

A policy directory holds `model.conf` (Airlock's Casbin model: RBAC with domains, deny overrides
allow, default deny), `policy.csv` (`p`/`g` lines), `tenants.toml` (per-tenant settings) and
`tests.yaml` (cases that must pass before the policy serves). Casbin defines the semantics: the
model must be Airlock's own, `casbin_enforcer()` answers any request the Casbin way, and a
differential test holds `Policy.decide` (an index over the same lines, fast at 100k lines) to it.
"""

from __future__ import annotations

import re
import tomllib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import casbin
import yaml
from casbin.persist.adapters import FileAdapter

from airlock.attestation import LEVELS, AttestationPolicy
from gateway.policy.text import PolicyError, csv_lines, read_policy_file, show
from gateway.quota import QuotaLimits

__all__ = [
    "ACTIONS",
    "MAX_HOPS",
    "Decision",
    "Policy",
    "PolicyCase",
    "PolicyError",
    "RoleLink",
    "Rule",
    "TenantSettings",
    "key_match",
    "load_policy",
]

ACTIONS = ("generate", "stream", "list", "attest", "admin", "*")
EFFECTS = ("allow", "deny")
MAX_HOPS = 9  # Casbin's role manager follows at most 10 levels: the subject and 9 role hops
_TENANT = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_MODEL_SECTIONS = {
    ("r", "r"): "sub, dom, obj, act",
    ("p", "p"): "sub, dom, obj, act, eft",
    ("g", "g"): "_, _, _",
    ("e", "e"): "some(where (p.eft == allow)) && !some(where (p.eft == deny))",
    ("m", "m"): (
        "g(r.sub, p.sub, r.dom) && keyMatch(r.dom, p.dom) && keyMatch(r.obj, p.obj) "
        '&& (r.act == p.act || p.act == "*")'
    ),
}


@dataclass(frozen=True)
class Rule:
    """A `p` line: SUBJECT-OR-ROLE may (allow) or may not (deny) do ACTION on RESOURCE in TENANT."""

    line: int
    subject: str
    tenant: str
    resource: str
    action: str
    effect: str

    def __str__(self) -> str:
        return f"p, {self.subject}, {self.tenant}, {self.resource}, {self.action}, {self.effect}"


@dataclass(frozen=True)
class RoleLink:
    """A `g` line: MEMBER has ROLE in TENANT."""

    line: int
    member: str
    role: str
    tenant: str

    def __str__(self) -> str:
        return f"g, {self.member}, {self.role}, {self.tenant}"


@dataclass(frozen=True)
class TenantSettings:
    name: str
    issuers: tuple[str, ...]
    quota: QuotaLimits = field(default_factory=QuotaLimits)
    attestation: AttestationPolicy = field(default_factory=AttestationPolicy)
    # "shared": the security team opts this tenant in to workers that serve several tenants.
    isolation: str = "dedicated"


@dataclass(frozen=True)
class PolicyCase:
    """One entry of tests.yaml."""

    index: int
    subject: str
    tenant: str
    resource: str
    action: str
    expect: str


@dataclass(frozen=True)
class Decision:
    """The answer for one request, with what decided it (for audit and `airlock policy explain`)."""

    allowed: bool
    rule: Rule | None  # the deny that won, else the first allow; None: no rule matched (default deny)
    roles: tuple[str, ...]  # the subject's roles in the tenant (transitively)
    matched: tuple[Rule, ...] = ()


def key_match(key: str, pattern: str) -> bool:
    """Casbin's keyMatch: `pattern` may contain one `*`, which matches any rest of `key`."""
    star = pattern.find("*")
    if star == -1:
        return key == pattern
    return key[:star] == pattern[:star] if len(key) > star else key == pattern[:star]


@dataclass
class Policy:
    """A validated policy generation: the lines, the tenants, the test cases and their index."""

    directory: Path
    rules: tuple[Rule, ...]
    links: tuple[RoleLink, ...]
    tenants: dict[str, TenantSettings]
    cases: tuple[PolicyCase, ...]
    model_text: str
    _roles: dict[tuple[str, str], list[str]] = field(init=False, repr=False)
    _by_tenant: dict[str, list[Rule]] = field(init=False, repr=False)
    _patterned: list[Rule] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._roles = defaultdict(list)
        for link in self.links:
            self._roles[(link.tenant, link.member)].append(link.role)
        self._by_tenant = defaultdict(list)
        self._patterned = []
        for rule in self.rules:
            if "*" in rule.tenant:
                self._patterned.append(rule)
            else:
                self._by_tenant[rule.tenant].append(rule)

    def roles_of(self, subject: str, tenant: str) -> tuple[str, ...]:
        """The roles `subject` holds in `tenant`, following role hierarchies as Casbin does."""
        seen: dict[str, None] = {}
        frontier = [subject]
        for _ in range(MAX_HOPS):
            nxt = []
            for name in frontier:
                for role in self._roles.get((tenant, name), ()):
                    if role not in seen and role != subject:
                        seen[role] = None
                        nxt.append(role)
            if not nxt:
                break
            frontier = nxt
        return tuple(seen)

    def decide(self, subject: str, tenant: str, resource: str, action: str) -> Decision:
        roles = self.roles_of(subject, tenant)
        names = {subject, *roles}
        candidates = self._by_tenant.get(tenant, [])
        if self._patterned:
            candidates = candidates + [r for r in self._patterned if key_match(tenant, r.tenant)]
        matched = tuple(
            r
            for r in candidates
            if r.subject in names
            and key_match(resource, r.resource)
            and (r.action == action or r.action == "*")
        )
        if len(matched) > 1:  # name the earliest line that decided, as a reader of the file expects
            matched = tuple(sorted(matched, key=lambda r: r.line))
        deny = next((r for r in matched if r.effect == "deny"), None)
        if deny is not None:
            return Decision(False, deny, roles, matched)
        allow = next((r for r in matched if r.effect == "allow"), None)
        return Decision(allow is not None, allow, roles, matched)

    def take_apart(self) -> list[Any]:
        """Move this policy's containers out of it and return them, so that the holder of its only
        reference can free ~100k lines a few at a time (gateway.policy.authz). The policy is empty
        afterwards."""
        parts = [self._roles, self._by_tenant, self._patterned, self.tenants,
                 list(self.rules), list(self.links), list(self.cases)]  # fmt: skip
        self.rules, self.links, self.cases = (), (), ()
        self._roles, self._by_tenant, self._patterned, self.tenants = {}, {}, [], {}
        return parts

    def failing_cases(self) -> list[tuple[PolicyCase, Decision]]:
        out = []
        for case in self.cases:
            decision = self.decide(case.subject, case.tenant, case.resource, case.action)
            if decision.allowed != (case.expect == "allow"):
                out.append((case, decision))
        return out

    def casbin_enforcer(self) -> casbin.Enforcer:
        """Casbin's own enforcer over the same lines: the reference `decide` is tested against.

        Casbin scans every line per decision (measured at 100k lines: ~95 s to build, ~0.2 s per
        decision): for explanations and tests, never for the request path."""
        enforcer = casbin.Enforcer(casbin.Enforcer.new_model(text=self.model_text))
        if self.rules:
            enforcer.add_named_policies(
                "p", [[r.subject, r.tenant, r.resource, r.action, r.effect] for r in self.rules]
            )
        if self.links:
            enforcer.add_named_grouping_policies("g", [[k.member, k.role, k.tenant] for k in self.links])
        return enforcer

    def casbin_reads_differently(self) -> str | None:
        """None when Casbin's own file adapter reads policy.csv into exactly our lines, in order;
        else the first difference. The grammar (`gateway.policy.text`) makes this None for every
        file we accept; `lint` and `explain` check it anyway, so a reader can trust their answers."""
        model = casbin.Enforcer.new_model(text=self.model_text)
        try:
            FileAdapter(str(self.directory / "policy.csv")).load_policy(model)
        except Exception as exc:  # Casbin's reader fails with IndexError and others, not its own errors
            return f"Casbin's file reader fails on it ({type(exc).__name__}: {str(exc)[:200]})"
        for key, ours in (
            ("p", [[r.subject, r.tenant, r.resource, r.action, r.effect] for r in self.rules]),
            ("g", [[k.member, k.role, k.tenant] for k in self.links]),
        ):
            theirs = [list(line) for line in model.model[key][key].policy]
            if theirs != ours:
                at = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                          min(len(ours), len(theirs)))  # fmt: skip
                mine = ", ".join(ours[at]) if at < len(ours) else "nothing"
                other = ", ".join(theirs[at]) if at < len(theirs) else "nothing"
                return (f"{len(theirs)} {key} lines for Casbin, {len(ours)} for Airlock; {key} line "
                        f"{at + 1}: Casbin reads {show(other)}, Airlock {show(mine)}")  # fmt: skip
        return None


def load_policy(directory: Path) -> Policy:
    """Load and validate a policy directory; raise `PolicyError` naming file, line and reason.

    The test cases are loaded but not run: callers decide (the gateway refuses a policy whose cases
    fail; `airlock policy test` reports them)."""
    directory = Path(directory)
    model_text = _read(directory / "model.conf")
    _check_model(directory / "model.conf", model_text)
    tenants = _load_tenants(directory / "tenants.toml")
    rules, links = _load_lines(directory / "policy.csv", tenants)
    cases = _load_cases(directory / "tests.yaml", tenants)
    return Policy(directory, tuple(rules), tuple(links), tenants, tuple(cases), model_text)


def _read(path: Path) -> str:
    """Every file of the directory obeys one text grammar (`gateway.policy.text`)."""
    return read_policy_file(path)


def _key(name: str) -> str:
    """A TOML key as written in a message: bare when it is a plain word, else quoted and cut short."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name) else show(name)


def _parser_error(exc: Exception) -> str:
    """A parser's own message (it names the line), or what went wrong when it has none useful."""
    if isinstance(exc, tomllib.TOMLDecodeError | yaml.YAMLError):
        return str(exc)[:2000]
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def _check_model(path: Path, text: str) -> None:
    try:
        model = casbin.Enforcer.new_model(text=text)
    except Exception as exc:  # Casbin raises bare Exceptions for syntax errors
        raise PolicyError(f"{path}: not a valid Casbin model ({exc})") from None
    for (sec, key), expected in _MODEL_SECTIONS.items():
        got = model.model.get(sec, {}).get(key)
        actual = str(got.value) if got is not None else None
        if actual is None or _normal(actual) != _normal(expected):
            raise PolicyError(
                f"{path}: [{sec}] {key} differs from Airlock's model (RBAC with domains, deny overrides "
                "allow, default deny); edit policy.csv, not the model"
            )


def _normal(expr: str) -> str:
    """Casbin rewrites `p.eft` to `p_eft` when it parses; compare both forms alike, ignoring
    whitespace except inside string literals (`"* "` is not `"*"`)."""
    expr = re.sub(r"\b([rp])\.(\w+)", r"\1_\2", expr)
    parts = expr.split('"')  # even indexes are outside quotes
    return '"'.join(p if i % 2 else re.sub(r"\s+", "", p) for i, p in enumerate(parts))


def _load_tenants(path: Path) -> dict[str, TenantSettings]:
    text = _read(path)
    try:
        raw = tomllib.loads(text)
    except Exception as exc:  # any failure of the parser (e.g. RecursionError on deep nesting) refuses
        raise PolicyError(f"{path}: not valid TOML ({_parser_error(exc)})") from None
    if set(raw) - {"tenants"}:
        raise PolicyError(f"{path}: unknown key {show(sorted(set(raw) - {'tenants'})[0])}")
    table = raw.get("tenants", {})
    if not isinstance(table, dict) or not table:
        raise PolicyError(f"{path}: must define at least one [tenants.NAME] table")
    out = {}
    for name, settings in table.items():
        if not _TENANT.fullmatch(name):
            raise PolicyError(
                f"{path}: tenants.{_key(name)}: tenant names are lowercase letters, digits and '-'"
            )
        where = f"{path}: tenants.{name}"
        if not isinstance(settings, dict) or set(settings) - {"issuers", "quota", "attestation", "isolation"}:
            raise PolicyError(f"{where}: only 'issuers', 'quota', 'attestation' and 'isolation' may be set")
        issuers = settings.get("issuers", [])
        if not isinstance(issuers, list) or not all(isinstance(i, str) and i for i in issuers):
            raise PolicyError(f"{where}.issuers: must be a list of issuer names")
        quota = _load_quota(f"{where}.quota", settings.get("quota", {}))
        attestation = _load_attestation(f"{where}.attestation", settings.get("attestation", {}))
        isolation = settings.get("isolation", "dedicated")
        if isolation not in ("dedicated", "shared"):  # a typo must not opt a tenant in
            raise PolicyError(f'{where}.isolation: must be "dedicated" or "shared", got {show(isolation)}')
        out[name] = TenantSettings(name, tuple(issuers), quota, attestation, isolation)
    return out


_DIGEST = re.compile(r"[0-9a-f]{64}")


def _load_attestation(where: str, raw: Any) -> AttestationPolicy:
    """A tenant's `[tenants.NAME.attestation]`: `min_level` (default "software") and optional
    allow-lists of sha256 values per measurement (`code`, `config`, `model`)."""
    if not isinstance(raw, dict) or set(raw) - {"min_level", "measurements"}:
        raise PolicyError(f"{where}: only 'min_level' and 'measurements' may be set")
    level = raw.get("min_level", "software")
    if level not in LEVELS:
        raise PolicyError(f"{where}.min_level: must be one of {', '.join(LEVELS)}, got {show(level)}")
    measurements = raw.get("measurements", {})
    if not isinstance(measurements, dict) or set(measurements) - {"code", "config", "model"}:
        raise PolicyError(f"{where}.measurements: only 'code', 'config' and 'model' may be listed")
    allowed: dict[str, tuple[str, ...]] = {}
    for name, values in measurements.items():
        if (
            not isinstance(values, list)
            or not values
            or not all(isinstance(v, str) and _DIGEST.fullmatch(v) for v in values)
        ):
            raise PolicyError(
                f"{where}.measurements.{name}: a non-empty list of lowercase sha256 hex digests"
            )
        allowed[name] = tuple(values)
    return AttestationPolicy(min_level=level, measurements=allowed)


_QUOTA_KEYS = {
    "requests_per_second": float, "burst": int, "tokens_per_minute": int, "concurrent_streams": int,
}  # fmt: skip


def _load_quota(where: str, raw: Any) -> QuotaLimits:
    """A tenant's `[tenants.NAME.quota]`: each limit optional (absent: not limited) and, when set,
    positive. A bad value refuses the whole policy: a typo must not lift a limit."""
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: must be a table")
    for key in sorted(set(raw) - set(_QUOTA_KEYS)):
        raise PolicyError(f"{where}.{_key(key)}: unknown key (one of {', '.join(sorted(_QUOTA_KEYS))})")
    values: dict[str, Any] = {}
    for key, kind in _QUOTA_KEYS.items():
        if key not in raw:
            continue
        value = raw[key]
        numeric = (int, float) if kind is float else (int,)
        if isinstance(value, bool) or not isinstance(value, numeric) or not 0 < value < 1e12:
            kind_name = "number" if kind is float else "integer"
            raise PolicyError(f"{where}.{key}: must be a positive {kind_name}, got {show(value)}")
        values[key] = kind(value)
    if "burst" in values and "requests_per_second" not in values:
        raise PolicyError(f"{where}.burst: only meaningful with requests_per_second")
    return QuotaLimits(**values)


def _load_lines(path: Path, tenants: dict[str, TenantSettings]) -> tuple[list[Rule], list[RoleLink]]:
    rules: list[Rule] = []
    links: list[RoleLink] = []
    for number, fields in csv_lines(path, _read(path)):
        where = f"{path}:{number}"
        kind, values = fields[0], fields[1:]
        if kind == "p":
            if len(values) != 5:
                raise PolicyError(
                    f"{where}: a p line has 5 fields (subject, tenant, resource, action, effect)"
                )
            subject, tenant, resource, action, effect = values
            if action not in ACTIONS:
                raise PolicyError(f"{where}: unknown action {show(action)} (one of {', '.join(ACTIONS)})")
            if effect not in EFFECTS:
                raise PolicyError(f"{where}: effect must be allow or deny, got {show(effect)}")
            _check_tenant(where, tenant, tenants, pattern_ok=True)
            if "*" in subject:
                raise PolicyError(f"{where}: subjects and roles are matched exactly; '*' is not allowed")
            rules.append(Rule(number, subject, tenant, resource, action, effect))
        elif kind == "g":
            if len(values) != 3:
                raise PolicyError(f"{where}: a g line has 3 fields (subject, role, tenant)")
            member, role, tenant = values
            _check_tenant(where, tenant, tenants, pattern_ok=False)
            if "*" in member or "*" in role:
                raise PolicyError(f"{where}: subjects and roles are matched exactly; '*' is not allowed")
            links.append(RoleLink(number, member, role, tenant))
        else:
            raise PolicyError(f"{where}: lines start with p or g, got {show(kind)}")
    return rules, links


def _check_tenant(where: str, tenant: str, tenants: dict[str, TenantSettings], *, pattern_ok: bool) -> None:
    if "*" in tenant:
        if not pattern_ok:
            raise PolicyError(f"{where}: role lines name one tenant; '*' is not allowed")
        return  # patterns are linted (`airlock policy lint`), not refused: Casbin accepts them
    if tenant not in tenants:
        raise PolicyError(f"{where}: unknown tenant {show(tenant)} (not in tenants.toml)")


def _load_cases(path: Path, tenants: dict[str, TenantSettings]) -> list[PolicyCase]:
    if not path.exists():
        return []
    text = _read(path)
    try:
        raw: Any = yaml.safe_load(text)
    except Exception as exc:  # PyYAML raises ValueError for a bad date, RecursionError for deep nesting
        raise PolicyError(f"{path}: not valid YAML ({_parser_error(exc)})") from None
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise PolicyError(f"{path}: must be a list of cases")
    keys = {"subject", "tenant", "resource", "action", "expect"}
    out = []
    for index, case in enumerate(raw, start=1):
        if not isinstance(case, dict) or set(case) != keys:
            raise PolicyError(f"{path}: case {index}: needs exactly {', '.join(sorted(keys))}")
        if not all(isinstance(case[k], str) for k in keys) or case["expect"] not in EFFECTS:
            raise PolicyError(f"{path}: case {index}: string values; expect is allow or deny")
        # A typo here would make an `expect: deny` case pass without testing anything.
        if case["tenant"] not in tenants:
            raise PolicyError(f"{path}: case {index}: unknown tenant {show(case['tenant'])}")
        if case["action"] not in ACTIONS or case["action"] == "*":
            raise PolicyError(f"{path}: case {index}: action must be one of {', '.join(ACTIONS[:-1])}")
        out.append(PolicyCase(index, case["subject"], case["tenant"], case["resource"], case["action"],
                              case["expect"]))  # fmt: skip
    return out
