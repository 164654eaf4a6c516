"""The `airlock` command: run a stack, mint development tokens, send a request.

    airlock up [--config FILE] [--demo]     gateway + one worker per tenant model, in the foreground
    airlock token --tenant T --subject S    print a development JWT signed with the dev key
    airlock cert --tenant T --service S     issue a development service certificate (mTLS, SPIFFE ID)
    airlock generate --tenant T "prompt"    stream an answer, then token counts and latency
    airlock policy lint [--dir DIR]         find risky or mistaken lines in a policy directory
    airlock policy test [--dir DIR]         run the policy's tests.yaml cases, list every failure
    airlock policy explain --subject S --tenant T --resource R --action A [--dir DIR]
                                            the decision for one request and the rules behind it
    airlock audit verify | bundle create|sign|verify|keygen | health    (control/cli/ops.py)
    airlock keys create|rotate|retire|list --tenant T [--key-id K]
                                            manage tenant data keys (docs/keys.md)
    airlock lockout list | clear (--subject S | --peer P | --key K | --all)
                                            a running gateway's lockouts, via its admin socket
    airlock domains [--json]                this host's isolation domains (MIG, GPUs, or the CPU)
    airlock plan --model M --domain D [--gpus N]
                                            weights + KV cache + margin; refuses what can't fit

Exit codes: 0 success, 1 runtime failure (lint errors, failing cases), 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from airlock import AirlockError, Client
from control.cli.keys import add_keys_commands
from control.cli.lockout import add_lockout_commands
from control.cli.ops import add_ops_commands
from control.launcher import Stack, StackError
from control.pki import ensure_dev_pki, issue_service_cert
from control.tokens import mint_dev_token
from gateway import config as config_mod
from gateway.keys.store import KeystoreError, ensure_tenant_keys, open_keystore
from gateway.policy.lint import home_tenant, lint_directory
from gateway.policy.rules import ACTIONS, Decision, Policy, PolicyError, Rule, load_policy

DEMO_PROMPT = "In one sentence, what is an air-gapped computer?"


def _err(message: str) -> None:
    print(f"airlock: {message}", file=sys.stderr, flush=True)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _load(args: argparse.Namespace) -> config_mod.Config:
    return config_mod.load(args.config, state_dir=args.state_dir)


def cmd_up(args: argparse.Namespace) -> int:
    cfg = _load(args)
    for made in ensure_tenant_keys(open_keystore(cfg.keys, cfg.state_dir), cfg.tenants):
        _err(f"created key {made.key_id} for tenant {made.tenant} ({made.backend} keystore)")
    stack = Stack(cfg, listen=args.listen, log_level=args.log_level)
    # While starting, Ctrl-C or SIGTERM interrupts the start (which stops what it started);
    # once up, they ask the loop below to stop everything in order.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    _err(
        f"starting {sum(len(t.models) for t in cfg.tenants.values())} worker(s) and the gateway "
        f"(state: {cfg.state_dir}); the first start converts the bundled model, ~30 s"
    )
    try:
        stack.start(progress=_err)
    except StackError as exc:
        _err(f"failed to start: {exc}")
        return 1
    except KeyboardInterrupt:
        _err("interrupted while starting; everything started was stopped")
        return 130
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        ca = stack.pki.ca_cert if stack.pki else "?"
        print(f"Airlock is up: gateway on {stack.address} (TLS; CA certificate {ca})")
        if stack.mtls_address:
            print(f"  services (mTLS, certificates from `airlock cert`): {stack.mtls_address}")
        for (tenant, model), child in stack.workers.items():
            who = ", ".join(child.info.get("tenants") or [tenant])  # a shared worker serves several
            print(f"  tenant {who}: model {model} in worker pid {child.process.pid}")
        print(f"  logs: {stack.run_dir}")
        print(f'  try:  airlock generate --tenant {next(iter(cfg.tenants))} "Hello"')
        print("Ctrl-C stops everything.", flush=True)
        if args.demo:
            _demo(cfg, stack)
        while not stop.wait(0.5):
            # The supervisor restarts workers (after scrubbing their domain); only the gateway's exit,
            # or a worker's when restarts are off, ends `up`.
            watched = stack.children() if not cfg.supervisor.restart else [stack.gateway]
            dead = [c for c in watched if c is not None and c.process.poll() is not None]
            if dead:
                _err(
                    f"{dead[0].name} exited unexpectedly (code {dead[0].process.returncode}); "
                    f"its log ends with:\n{dead[0].log_tail()}"
                )
                return 1
        return 0
    finally:
        _err("stopping…")
        stack.stop()
        _err("stopped")


def _demo(cfg: config_mod.Config, stack: Stack) -> None:
    pki = ensure_dev_pki(cfg.state_dir)
    for tenant in cfg.tenants:
        token = mint_dev_token(pki, cfg.auth, tenant=tenant, subject="demo")
        with Client(stack.address, token=token, ca_cert=pki.ca_cert) as client:
            answer = client.generate(DEMO_PROMPT, max_tokens=64, temperature=0.0)
        print(
            f"[{tenant}] {DEMO_PROMPT}\n[{tenant}] {answer.model}: {answer.text.strip()}\n"
            f"[{tenant}] ({answer.prompt_tokens} prompt + {answer.completion_tokens} completion tokens)",
            flush=True,
        )


def cmd_cert(args: argparse.Namespace) -> int:
    cfg = _load(args)
    pki = ensure_dev_pki(cfg.state_dir)
    issued = issue_service_cert(
        pki, tenant=args.tenant, service=args.service, trust_domain=cfg.auth.mtls.trust_domain,
        out_dir=args.out, valid_days=args.days,
    )  # fmt: skip
    print(f"identity:    {issued.spiffe_id}")
    print(f"certificate: {issued.cert}")
    print(f"key:         {issued.key} (mode 0600)")
    print(f"trust:       {pki.ca_cert} (the gateway's CA)")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    cfg = _load(args)
    limit = cfg.auth.max_token_lifetime_seconds
    if not 0 < args.ttl <= limit:
        _err(f"token: --ttl must be 1..{limit} seconds (auth.max_token_lifetime_seconds), got {args.ttl}")
        return 2
    pki = ensure_dev_pki(cfg.state_dir)
    print(mint_dev_token(pki, cfg.auth, tenant=args.tenant, subject=args.subject, ttl_seconds=args.ttl))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    cfg = _load(args)
    pki = ensure_dev_pki(cfg.state_dir)
    address = args.address or _running_address(cfg) or cfg.gateway.listen
    token = args.token or mint_dev_token(pki, cfg.auth, tenant=args.tenant, subject=args.subject)
    params: dict[str, Any] = {"model": args.model, "max_tokens": args.max_tokens}
    if args.temperature is not None:
        params["temperature"] = args.temperature
    if args.seed is not None:
        params["seed"] = args.seed
    start = time.perf_counter()
    first: float | None = None
    try:
        with Client(address, token=token, ca_cert=pki.ca_cert) as client:
            for chunk in client.stream(args.prompt, timeout=args.timeout, **params):
                if first is None and chunk.text:
                    first = time.perf_counter() - start
                print(chunk.text, end="", flush=True)
                if chunk.finish_reason is not None:
                    total = time.perf_counter() - start
                    rate = chunk.completion_tokens / total if total > 0 else 0.0
                    print()
                    _err(
                        f"{chunk.prompt_tokens} prompt + {chunk.completion_tokens} completion tokens, "
                        f"finish={chunk.finish_reason}, first token {1000 * (first or total):.0f} ms, "
                        f"total {total:.2f} s, {rate:.1f} tokens/s"
                    )
    except AirlockError as exc:
        print()
        _err(f"request failed: {exc.code.name}: {exc}")
        return 1
    return 0


def _running_address(cfg: config_mod.Config) -> str | None:
    try:
        return str(json.loads((cfg.state_dir / "run" / "stack.json").read_text())["address"])
    except (OSError, ValueError, KeyError):
        return None


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


def cmd_policy_lint(args: argparse.Namespace) -> int:
    findings = lint_directory(args.dir)
    for finding in findings:
        print(finding)
    errors = sum(f.severity == "error" for f in findings)
    warnings = len(findings) - errors
    failed = errors > 0 or (args.strict and warnings > 0)
    print(f"{args.dir}: {errors} error(s), {warnings} warning(s){' (--strict)' if args.strict else ''}")
    return 1 if failed else 0


def cmd_policy_test(args: argparse.Namespace) -> int:
    policy = _load_policy(args.dir)
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
    print(f"{len(policy.cases) - len(failing)} passed, {len(failing)} failed")
    return 1 if failing else 0


def cmd_policy_explain(args: argparse.Namespace) -> int:
    policy = _load_policy(args.dir)
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


def _add_policy_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    policy = sub.add_parser("policy", help="lint, test and explain a policy directory offline")
    psub = policy.add_subparsers(dest="policy_command", required=True)
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument(
        "--dir", type=Path, default=Path("policy"), help="policy directory (default: ./policy)"
    )

    lint = psub.add_parser("lint", parents=[where], help="find risky or mistaken policy lines")
    lint.add_argument("--strict", action="store_true", help="fail on warnings too")
    lint.set_defaults(func=cmd_policy_lint)

    test = psub.add_parser("test", parents=[where], help="run every case in tests.yaml")
    test.set_defaults(func=cmd_policy_test)

    explain = psub.add_parser("explain", parents=[where], help="explain the decision for one request")
    explain.add_argument("--subject", required=True, help="TENANT/NAME, or a service's SPIFFE ID")
    explain.add_argument("--tenant", required=True)
    explain.add_argument("--resource", required=True, help="e.g. model:NAME, models, admin:OPERATION")
    explain.add_argument("--action", required=True, choices=[a for a in ACTIONS if a != "*"])
    explain.set_defaults(func=cmd_policy_explain)


def _name(text: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: lowercase letters, digits and '-'")
    return text


# Commands the worker package implements: the gateway never imports worker code (it would pull
# in torch and NVML), so these run as `python -m worker.<module>` with the arguments passed on.
WORKER_COMMANDS = {"domains": "worker.isolation.domains", "plan": "worker.isolation.plan"}


def _run_worker_command(module: str, argv: list[str]) -> int:
    return subprocess.run([sys.executable, "-m", module, *argv], check=False).returncode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="airlock", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="TOML configuration (default: built-in demo)")
    common.add_argument("--state-dir", type=Path, help="override state_dir from the configuration")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", parents=[common], help="start gateway and workers in the foreground")
    up.add_argument("--listen", help="override gateway.listen")
    up.add_argument("--demo", action="store_true", help="send one demo request per tenant once up")
    up.add_argument("--log-level", default="info")
    up.set_defaults(func=cmd_up)

    token = sub.add_parser("token", parents=[common], help="print a development token")
    token.add_argument("--tenant", required=True)
    token.add_argument("--subject", required=True)
    token.add_argument(
        "--ttl", type=int, default=3600,
        help="lifetime in seconds, 1..auth.max_token_lifetime_seconds (default 3600)",
    )  # fmt: skip
    token.set_defaults(func=cmd_token)

    cert = sub.add_parser("cert", parents=[common], help="issue a development service certificate (mTLS)")
    cert.add_argument("--tenant", required=True, type=_name)
    cert.add_argument("--service", required=True, type=_name)
    cert.add_argument("--out", type=Path, help="directory for the files (default: state_dir/pki/services)")
    cert.add_argument("--days", type=int, default=30, help="validity in days (default 30)")
    cert.set_defaults(func=cmd_cert)

    gen = sub.add_parser("generate", parents=[common], help="stream an answer from a running stack")
    gen.add_argument("prompt")
    gen.add_argument("--tenant", required=True)
    gen.add_argument("--subject", default="cli")
    gen.add_argument("--token", help="use this token instead of minting a dev token")
    gen.add_argument("--address", help="gateway HOST:PORT (default: the running stack's)")
    gen.add_argument("--model", default="")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--timeout", type=float, default=120.0)
    gen.set_defaults(func=cmd_generate)

    _add_policy_commands(sub)
    add_ops_commands(sub, common)
    add_keys_commands(sub, common)
    add_lockout_commands(sub, common)
    sub.add_parser("domains", add_help=False, help="list isolation domains (--help for options)")
    sub.add_parser("plan", add_help=False, help="check a model fits a domain (--help for options)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in WORKER_COMMANDS:
        return _run_worker_command(WORKER_COMMANDS[argv[0]], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except config_mod.ConfigError as exc:
        _err(f"config error: {exc}")
        return 2
    except KeystoreError as exc:
        _err(f"keystore: {exc}")
        return 1
