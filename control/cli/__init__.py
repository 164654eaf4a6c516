"""The `airlock` command: run a development stack, manage keys and policy, check the audit trail.

    airlock up [--config FILE] [--demo]     gateway + one worker per tenant model, in the foreground
    airlock token --tenant T --subject S    print a development JWT signed with the dev key
    airlock cert --tenant T --service S     issue a development service certificate (mTLS, SPIFFE ID)
    airlock generate --tenant T "prompt"    stream an answer, then token counts and latency
    airlock health [--service S]            gRPC health check of a gateway
    airlock policy lint|test [--dir DIR]    find risky lines; run the policy's tests.yaml cases
    airlock policy explain --subject S --tenant T --resource R --action A [--dir DIR]
                                            the decision for one request and the rules behind it
    airlock audit verify | head             check the hash chains and signatures; export a signed head
    airlock bundle keygen|create|sign|verify|push|pull
                                            signed model bundles (push|pull: an S3 store)
    airlock keys create|rotate|retire|list --tenant T [--key-id K]
                                            manage tenant data keys
    airlock lockout list | clear (--subject S | --peer P | --key K | --all)
                                            a running gateway's lockouts, via its admin socket
    airlock domains [--json]                this host's isolation domains (MIG, GPUs, or the CPU)
    airlock plan --model M --domain D [--gpus N]
                                            weights + KV cache + margin; refuses what can't fit

Exit codes: 0 success, 1 runtime failure (lint errors, failing cases), 2 bad configuration or usage.

This module only declares the commands; each one's module is imported when it runs, so a command
pays for what it uses (`airlock keys list` loads no launcher, no policy engine, no Redis client).
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["build_parser", "main"]

# The policy's actions (gateway.policy.rules.ACTIONS, less "*"), spelled here so the parser needs no
# policy engine; a test keeps the two equal.
POLICY_ACTIONS = ("generate", "stream", "list", "attest", "admin")
# Commands the worker package implements: the control plane never imports worker code (it would
# pull in torch and NVML), so these run as `python -m worker.<module>` with the arguments passed on.
WORKER_COMMANDS = {"domains": "worker.isolation.domains", "plan": "worker.isolation.plan"}


def _name(text: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: lowercase letters, digits and '-'")
    return text


def _command(parser: argparse.ArgumentParser, handler: str) -> None:
    """Run `module:function` (in control.cli) for this command, importing the module only then."""
    parser.set_defaults(handler=handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="airlock", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="TOML configuration (default: built-in demo)")
    common.add_argument("--state-dir", type=Path, help="override state_dir from the configuration")
    sub = parser.add_subparsers(dest="command", required=True)
    _stack_commands(sub, common)
    _policy_commands(sub)
    _ops_commands(sub, common)
    _keys_commands(sub, common)
    _lockout_commands(sub, common)
    sub.add_parser("domains", add_help=False, help="list isolation domains (--help for options)")
    sub.add_parser("plan", add_help=False, help="check a model fits a domain (--help for options)")
    return parser


def _stack_commands(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    up = sub.add_parser("up", parents=[common], help="start gateway and workers in the foreground")
    up.add_argument("--listen", help="override gateway.listen")
    up.add_argument("--demo", action="store_true", help="send one demo request per tenant once up")
    up.add_argument("--log-level", default="info")
    _command(up, "stack:cmd_up")

    token = sub.add_parser("token", parents=[common], help="print a development token")
    token.add_argument("--tenant", required=True)
    token.add_argument("--subject", required=True)
    token.add_argument(
        "--ttl", type=int, default=3600,
        help="lifetime in seconds, 1..auth.max_token_lifetime_seconds (default 3600)",
    )  # fmt: skip
    _command(token, "stack:cmd_token")

    cert = sub.add_parser("cert", parents=[common], help="issue a development service certificate (mTLS)")
    cert.add_argument("--tenant", required=True, type=_name)
    cert.add_argument("--service", required=True, type=_name)
    cert.add_argument("--out", type=Path, help="directory for the files (default: state_dir/pki/services)")
    cert.add_argument("--days", type=int, default=30, help="validity in days (default 30)")
    _command(cert, "stack:cmd_cert")

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
    _command(gen, "stack:cmd_generate")


def _policy_commands(sub: Subparsers) -> None:
    policy = sub.add_parser("policy", help="lint, test and explain a policy directory offline")
    psub = policy.add_subparsers(dest="policy_command", required=True)
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument(
        "--dir", type=Path, default=Path("policy"), help="policy directory (default: ./policy)"
    )

    lint = psub.add_parser("lint", parents=[where], help="find risky or mistaken policy lines")
    lint.add_argument("--strict", action="store_true", help="fail on warnings too")
    _command(lint, "policy:cmd_policy_lint")

    test = psub.add_parser("test", parents=[where], help="run every case in tests.yaml")
    _command(test, "policy:cmd_policy_test")

    explain = psub.add_parser("explain", parents=[where], help="explain the decision for one request")
    explain.add_argument("--subject", required=True, help="TENANT/NAME, or a service's SPIFFE ID")
    explain.add_argument("--tenant", required=True)
    explain.add_argument("--resource", required=True, help="e.g. model:NAME, models, admin:OPERATION")
    explain.add_argument("--action", required=True, choices=POLICY_ACTIONS)
    _command(explain, "policy:cmd_policy_explain")


def _ops_commands(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    audit = sub.add_parser("audit", help="verify the tamper-evident audit trail")
    asub = audit.add_subparsers(dest="audit_command", required=True)
    verify = asub.add_parser("verify", parents=[common], help="check hash chains and signatures")
    where = verify.add_mutually_exclusive_group()
    where.add_argument("--dir", type=Path, help="verify every log in DIR (default: the configured one's)")
    where.add_argument("--file", type=Path, help="verify one log (its rotated files come with it)")
    verify.add_argument(
        "--key", type=Path, help="PEM file of Ed25519 public keys, old ones too (default: the dev audit key)"
    )
    verify.add_argument(
        "--require-signed", action="store_true", help="fail when any record is covered by no signature"
    )
    verify.add_argument(
        "--expect-head", type=Path, metavar="HEAD", help="fail unless the log still holds this head "
        "(a file written by `airlock audit head`)",
    )  # fmt: skip
    verify.add_argument(
        "--archive", metavar="S3_URL", help="fail unless the log holds every head archived under "
        "s3://BUCKET/PREFIX (default: audit.archive.url when given without a value)", nargs="?", const="",
    )  # fmt: skip
    _command(verify, "ops:cmd_audit_verify")
    head = asub.add_parser("head", parents=[common], help="print the last signed chain head (JSON)")
    head.add_argument("--file", type=Path, help="the log (default: the configured one)")
    head.add_argument(
        "--key", type=Path, help="PEM file of Ed25519 public keys, old ones too (default: the dev audit key)"
    )
    _command(head, "ops:cmd_audit_head")

    bundle = sub.add_parser("bundle", help="create, sign and verify signed model bundles")
    bsub = bundle.add_subparsers(dest="bundle_command", required=True)
    keygen = bsub.add_parser("keygen", help="make an Ed25519 signing key and its public half")
    keygen.add_argument("--out", type=Path, required=True)
    _command(keygen, "ops:cmd_bundle_keygen")
    create = bsub.add_parser("create", help="write the manifest of sha256 digests")
    create.add_argument("dir", type=Path)
    create.add_argument("--name", help="bundle name (default: the directory's)")
    _command(create, "ops:cmd_bundle_create")
    sign = bsub.add_parser("sign", parents=[common], help="sign the manifest")
    sign.add_argument("dir", type=Path)
    sign.add_argument("--key", type=Path, help="Ed25519 private key (default: the dev bundle key)")
    _command(sign, "ops:cmd_bundle_sign")
    check = bsub.add_parser("verify", parents=[common], help="check signature and every file")
    check.add_argument("dir", help="a bundle directory, or s3://BUCKET/PREFIX (streamed, not kept)")
    check.add_argument("--trusted-keys", type=Path, help="PEM public keys (default: bundles.trusted_keys)")
    _command(check, "ops:cmd_bundle_verify")
    push = bsub.add_parser("push", parents=[common], help="upload a signed bundle to S3 ([s3] in the config)")
    push.add_argument("dir", type=Path)
    push.add_argument("url", help="s3://BUCKET/PREFIX")
    push.add_argument(
        "--trusted-keys", type=Path, help="verify against these first (default: bundles.trusted_keys)"
    )
    _command(push, "storage:cmd_bundle_push")
    pull = bsub.add_parser(
        "pull", parents=[common], help="download a bundle from S3, verified while it streams"
    )
    pull.add_argument("url", help="s3://BUCKET/PREFIX")
    pull.add_argument("dir", type=Path, help="where the verified bundle goes (a folder, as sneakernet wants)")
    pull.add_argument("--trusted-keys", type=Path, help="PEM public keys (default: bundles.trusted_keys)")
    _command(pull, "storage:cmd_bundle_pull")

    health = sub.add_parser("health", parents=[common], help="gRPC health check of a gateway")
    health.add_argument("--address", help="HOST:PORT (default: gateway.listen)")
    health.add_argument("--ca", type=Path, help="CA certificate (default: the dev CA)")
    health.add_argument("--server-name", help="TLS name to expect when the address is not it")
    health.add_argument("--cert", type=Path, help="client certificate, for servers that require mTLS")
    health.add_argument("--key", type=Path, help="the client certificate's key")
    health.add_argument(
        "--service", default="",
        help="service name ('' = the whole server; tenant/NAME needs --token or --cert of that tenant)",
    )  # fmt: skip
    health.add_argument("--token", help="a bearer token, for a tenant's own status on the token port")
    health.add_argument("--timeout", type=float, default=5.0)
    _command(health, "ops:cmd_health")


def _keys_commands(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    keys = sub.add_parser("keys", help="create, rotate, list and retire tenant data keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True)

    create = ksub.add_parser("create", parents=[common], help="make the first key of a tenant")
    create.add_argument("--tenant", required=True, type=_name)
    _command(create, "keys:cmd_keys_create")

    rotate = ksub.add_parser("rotate", parents=[common], help="new active key; old one decrypt-only")
    rotate.add_argument("--tenant", required=True, type=_name)
    _command(rotate, "keys:cmd_keys_rotate")

    retire = ksub.add_parser("retire", parents=[common], help="destroy a decrypt-only key (irreversible)")
    retire.add_argument("--tenant", required=True, type=_name)
    retire.add_argument("--key-id", required=True)
    _command(retire, "keys:cmd_keys_retire")

    listing = ksub.add_parser("list", parents=[common], help="table of keys (never their material)")
    listing.add_argument("--tenant", type=_name, help="only this tenant's keys")
    _command(listing, "keys:cmd_keys_list")


def _lockout_commands(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    where = argparse.ArgumentParser(add_help=False, parents=[common])
    where.add_argument(
        "--socket", type=Path, help="the gateway's admin socket (default: gateway.admin_socket)"
    )
    where.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the gateway")
    lockout = sub.add_parser("lockout", help="list and clear a running gateway's lockouts")
    lsub = lockout.add_subparsers(dest="lockout_command", required=True)

    listing = lsub.add_parser("list", parents=[where], help="table of lockouts and recent failures")
    _command(listing, "lockout:cmd_lockout_list")

    clear = lsub.add_parser("clear", parents=[where], help="lift lockouts (audited)")
    which = clear.add_mutually_exclusive_group(required=True)
    which.add_argument("--subject", help="a verified identity: acme/alice, or a service's SPIFFE ID")
    which.add_argument("--peer", help="a client address, as `list` shows it after peer:")
    which.add_argument("--key", help="one key exactly as `list` shows it")
    which.add_argument("--all", action="store_true", help="every lockout and failure count")
    _command(clear, "lockout:cmd_lockout_clear")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in WORKER_COMMANDS:
        return subprocess.run(
            [sys.executable, "-m", WORKER_COMMANDS[argv[0]], *argv[1:]], check=False
        ).returncode
    args = build_parser().parse_args(argv)
    module, _, function = str(args.handler).partition(":")
    from control.cli.output import err

    try:
        run = getattr(importlib.import_module(f"control.cli.{module}"), function)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] in (
            "airlock",
            "serving",
            "gateway",
            "control",
            "worker",
        ):
            raise
        err(f"`airlock {args.command}` needs the server packages ({exc.name} is not installed): "
            "pip install 'airlock[gateway]'")  # fmt: skip
        return 2
    from gateway.config import ConfigError
    from gateway.keys import KeystoreError

    try:
        return int(run(args))
    except ConfigError as exc:
        err(f"config error: {exc}")
        return 2
    except KeystoreError as exc:
        err(f"keystore: {exc}")
        return 1
