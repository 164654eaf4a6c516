"""Differential test: `Policy.decide` (our index) against Casbin's own enforcer on random policies.

Casbin defines the semantics. Each seed generates a policy directory with ~20 tenants, role
hierarchies (chains longer than Casbin's 10-level limit, and cycles), direct subject rules, allows
and denies, resource, tenant and action patterns, loads it with `load_policy`, and asks both sides
the same few hundred random requests, biased towards requests that some line nearly matches.
"""

from __future__ import annotations

import itertools
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import casbin
import pytest

from gateway.policy.rules import ACTIONS, Policy, load_policy

REPO_POLICY = Path(__file__).resolve().parents[2] / "policy"
SEEDS = [1, 2, 3, 4, 5, 6, 7, 8]
REQUESTS_PER_SEED = 800
CHAIN = 13  # longer than Casbin's limit (the subject and 9 role hops)

RESOURCES = ["model:a", "model:abc", "model:b", "model:", "models", "admin:policy", "admin:usage", "x", "*",
             "model:*", "model:a*", ""]  # fmt: skip
RESOURCE_PATTERNS = ["model:*", "model:a*", "*", "model:abc", "admin:*", "models", "model:b", "admin:policy"]
REQUEST_ACTIONS = [*ACTIONS, "delete", ""]


@dataclass
class Generated:
    rules: list[str]
    links: list[str]
    tenants: list[str]
    subjects: list[str]  # every member or role that appears anywhere
    chains: list[tuple[str, str, list[str]]]  # (tenant, user, chain roles in hop order)


def generate(rng: random.Random) -> Generated:
    # t1..t20: `t1*` then matches t1 and t10..t19; plus a few other names.
    tenants = [f"t{i}" for i in range(1, 18)] + ["acme", "acme-eu", "globex"]
    roles = [f"role{i}" for i in range(12)]
    users = [f"u{i}" for i in range(30)]
    links: list[str] = []
    rules: list[str] = []
    chains: list[tuple[str, str, list[str]]] = []
    names = set(roles) | set(users)

    for tenant in tenants:
        # Users into roles, roles into roles (possibly cyclic, possibly self links).
        for _ in range(rng.randint(3, 8)):
            links.append(f"g, {rng.choice(users)}, {rng.choice(roles)}, {tenant}")
        for _ in range(rng.randint(1, 5)):
            links.append(f"g, {rng.choice(roles)}, {rng.choice(roles)}, {tenant}")
        if rng.random() < 0.2:
            links.append(f"g, {rng.choice(roles)}, {rng.choice(users)}, {tenant}")  # a role "in" a user
    for tenant in rng.sample(tenants, 4):
        # A long chain: user -> c1 -> c2 ... -> c13, each level with its own allow. The user is
        # in nothing else (its answers are known exactly); a random user joins the chain too.
        user = f"deep-{tenant}"
        chain = [f"chain{tenant}-{i}" for i in range(1, CHAIN + 1)]
        names.update([user, *chain])
        links.append(f"g, {user}, {chain[0]}, {tenant}")
        links.append(f"g, {rng.choice(users)}, {chain[rng.randrange(3)]}, {tenant}")
        links += [f"g, {a}, {b}, {tenant}" for a, b in itertools.pairwise(chain)]
        if rng.random() < 0.5:
            links.append(f"g, {chain[-1]}, {chain[rng.randrange(CHAIN - 1)]}, {tenant}")  # close a cycle
        rules += [f"p, {role}, {tenant}, model:{role}, generate, allow" for role in chain]
        rules.append(f"p, {chain[-1]}, {tenant}, *, list, allow")
        if rng.random() < 0.5:
            rules.append(f"p, {chain[10]}, {tenant}, *, list, deny")  # beyond reach: must not deny
        chains.append((tenant, user, chain))
    # A cycle of three roles in one tenant, with a rule at each corner.
    ring_tenant = rng.choice(tenants)
    ring = ["ring-a", "ring-b", "ring-c"]
    names.update(ring)
    links += [f"g, {a}, {b}, {ring_tenant}" for a, b in zip(ring, ring[1:] + ring[:1], strict=True)]
    links.append(f"g, {rng.choice(users)}, ring-a, {ring_tenant}")
    rules += [f"p, {r}, {ring_tenant}, model:{r}, *, allow" for r in ring]

    def tenant_pattern() -> str:
        roll = rng.random()
        if roll < 0.12:
            return "*"
        if roll < 0.25:
            return rng.choice(["t1*", "acme*", "t*", "g*", "acme-*"])
        return rng.choice(tenants)

    for _ in range(rng.randint(160, 260)):
        subject = rng.choice(roles) if rng.random() < 0.6 else rng.choice(users)
        effect = "deny" if rng.random() < 0.2 else "allow"
        action = rng.choice(ACTIONS)
        rules.append(f"p, {subject}, {tenant_pattern()}, {rng.choice(RESOURCE_PATTERNS)}, {action}, {effect}")
    rng.shuffle(rules)
    rng.shuffle(links)
    return Generated(rules, links, tenants, sorted(names), chains)


def write_policy(directory: Path, generated: Generated) -> None:
    directory.mkdir()
    shutil.copy(REPO_POLICY / "model.conf", directory / "model.conf")
    (directory / "tenants.toml").write_text(
        "".join(f'[tenants.{t}]\nissuers = ["issuer-{t}"]\n\n' for t in generated.tenants)
    )
    lines = ["# generated", *generated.rules, "", "# roles", *generated.links]
    (directory / "policy.csv").write_text("\n".join(lines) + "\n")
    (directory / "tests.yaml").write_text("")


def requests(rng: random.Random, policy: Policy, generated: Generated) -> list[tuple[str, str, str, str]]:
    subjects = [*generated.subjects, "ghost", "u999", "role", "chain"]
    tenants = [*generated.tenants, "t99", "t1x", "nowhere", "acme-us", "*", "t"]
    out: list[tuple[str, str, str, str]] = []
    for tenant, user, chain in generated.chains:
        for role in chain:
            out.append((user, tenant, f"model:{role}", "generate"))
        out.append((user, tenant, "model:x", "list"))
        out.append((chain[0], tenant, "model:x", "list"))
    while len(out) < REQUESTS_PER_SEED:
        if rng.random() < 0.65:
            # Near a rule: its subject (or a member of it) in a tenant it may cover.
            rule = rng.choice(policy.rules)
            members = [k.member for k in policy.links if k.role == rule.subject]
            members += [k.member for k in policy.links if k.role in members]  # two hops down
            subject = rng.choice([rule.subject, *members]) if members else rule.subject
            if "*" in rule.tenant:
                prefix = rule.tenant[: rule.tenant.index("*")]
                tenant = rng.choice([t for t in tenants if t.startswith(prefix)] or tenants)
            else:
                tenant = rule.tenant if rng.random() < 0.8 else rng.choice(tenants)
            if rng.random() < 0.3:
                resource = rng.choice(RESOURCES)
            elif "*" in rule.resource:
                prefix = rule.resource[: rule.resource.index("*")]
                resource = prefix + rng.choice(["", "a", "bc", "*", "policy"])
            else:
                resource = rule.resource
            action = rule.action if rule.action != "*" and rng.random() < 0.7 else rng.choice(REQUEST_ACTIONS)
            out.append((subject, tenant, resource, action))
        else:
            out.append((rng.choice(subjects), rng.choice(tenants), rng.choice(RESOURCES),
                        rng.choice(REQUEST_ACTIONS)))  # fmt: skip
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_decide_matches_casbin(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    generated = generate(rng)
    write_policy(tmp_path / "policy", generated)
    policy = load_policy(tmp_path / "policy")
    assert len(policy.rules) == len(generated.rules)
    assert len(policy.links) == len(generated.links)
    enforcer = policy.casbin_enforcer()
    # Casbin reading the files itself sees the same lines as the reference built from ours
    # (as sets: adding lines through the API drops duplicates, the file adapter keeps them).
    directory = tmp_path / "policy"
    from_files = casbin.Enforcer(str(directory / "model.conf"), str(directory / "policy.csv"))
    assert {tuple(p) for p in from_files.get_policy()} == {tuple(p) for p in enforcer.get_policy()}
    assert {tuple(g) for g in from_files.get_grouping_policy()} == {
        tuple(g) for g in enforcer.get_grouping_policy()
    }

    mismatches = []
    outcomes = {True: 0, False: 0}
    seen = {"deny over allow": 0, "tenant *": 0, "tenant prefix": 0, "action *": 0, "via a role": 0,
            "9 hops up": 0}  # fmt: skip
    for request in requests(rng, policy, generated):
        ours = policy.decide(*request)
        theirs = enforcer.enforce(*request)
        outcomes[theirs] += 1
        rule = ours.rule
        if rule is not None:
            overridden = any(r.effect == "allow" for r in ours.matched)
            seen["deny over allow"] += rule.effect == "deny" and overridden
            seen["tenant *"] += rule.tenant == "*"
            seen["tenant prefix"] += "*" in rule.tenant and rule.tenant != "*"
            seen["action *"] += rule.action == "*"
            seen["via a role"] += rule.subject in ours.roles
            seen["9 hops up"] += ours.allowed and rule.subject.endswith("-9")
        if ours.allowed != theirs:
            mismatches.append(
                f"{request}: casbin {'allow' if theirs else 'deny'}, ours {ours.allowed} "
                f"(rule {ours.rule}, roles {ours.roles}, matched {[str(r) for r in ours.matched]})"
            )
    assert not mismatches, f"seed {seed}: {len(mismatches)} mismatches:\n" + "\n".join(mismatches[:20])
    # Not vacuous: both answers are common, and the role-depth limit was exercised.
    total = sum(outcomes.values())
    assert outcomes[True] > total // 10 and outcomes[False] > total // 10, outcomes
    assert all(seen.values()), seen
    assert seen["9 hops up"] >= len(generated.chains), seen


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_chain_limit_is_casbins(tmp_path: Path, seed: int) -> None:
    """The generated chains really reach past Casbin's limit, and both sides stop at hop 9."""
    rng = random.Random(seed)
    generated = generate(rng)
    write_policy(tmp_path / "policy", generated)
    policy = load_policy(tmp_path / "policy")
    enforcer = policy.casbin_enforcer()
    for tenant, user, chain in generated.chains:
        theirs = [enforcer.enforce(user, tenant, f"model:{role}", "generate") for role in chain]
        ours = [policy.decide(user, tenant, f"model:{role}", "generate").allowed for role in chain]
        assert ours == theirs
        assert theirs == [True] * 9 + [False] * (CHAIN - 9)
        reach = policy.roles_of(user, tenant)
        assert chain[8] in reach and chain[9] not in reach
