"""The `airlock` command: its parser, and the dispatch to each command's module.

This module only declares the commands; each one's module (control/cli/*.py) is imported when it
runs, so a command pays for what it uses (`airlock keys list` loads no launcher, no policy engine,
no Redis client). gRPC's C-core logging is silenced before any of them imports grpc, unless
--verbose asks for it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["DESCRIPTION", "build_parser", "main"]

DESCRIPTION = """\
Airlock: a multi-tenant confidential inference gateway. Run a development stack, call it, manage
its tenants, keys and policy, and check its audit trail.

  airlock up [--config FILE] [--detach]      gateway + one worker per tenant model
  airlock status | down | usage              what a running stack does; stop it; who used what
  airlock generate --tenant T "prompt"       stream an answer from the running stack
  airlock token | cert                       development credentials (JWT, mTLS certificate)
  airlock tenant add|remove|list             the tenant set (config and policy files), reviewable
  airlock keys create|rotate|retire|list     tenant data keys
  airlock policy lint|test|explain           the security team's checks, offline
  airlock lockout list|clear                 a running gateway's lockouts
  airlock audit verify|head                  the tamper-evident audit trail
  airlock bundle keygen|create|sign|verify|push|pull
                                             signed model bundles (push|pull: an S3 store)
  airlock health | domains | plan            probes, isolation domains, capacity
  airlock completion bash|zsh                shell completion script

Commands find a running stack through its state directory (--state-dir, or the configuration's
state_dir). Exit codes: 0 success, 1 runtime failure, 2 bad configuration or usage."""

# The policy's actions (gateway.policy.rules.ACTIONS, less "*"), spelled here so the parser needs no
# policy engine; a test keeps the two equal.
POLICY_ACTIONS = ("generate", "stream", "list", "attest", "admin")
# Commands the worker package implements: the control plane never imports worker code (it would
# pull in torch and NVML), so these run as `python -m worker.<module>` with the arguments passed on.
WORKER_COMMANDS = {"domains": "worker.isolation.domains", "plan": "worker.isolation.plan"}
LOG_LEVELS = ("debug", "info", "warning", "error")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's default shown unless its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and default not in (None, False, argparse.SUPPRESS, "", [])
            and "default" not in text
        ):
            text += " (default: %(default)s)"
        return text


def _name(text: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", text):
        hint = (
            f": did you mean {text.lower()!r}?"
            if re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", text.lower())
            else ""
        )
        raise argparse.ArgumentTypeError(
            f"{text!r}: names are lowercase letters, digits and '-' (at most 63){hint}"
        )
    return text


def _command(parser: argparse.ArgumentParser, handler: str) -> None:
    """Run `module:function` (in control.cli) for this command, importing the module only then."""
    parser.set_defaults(handler=handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="airlock", description=DESCRIPTION, formatter_class=_Formatter)
    parser.add_argument("--verbose", action="store_true", help="show gRPC's own log lines (C-core)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="TOML configuration (default: the built-in demo)")
    common.add_argument(
        "--state-dir", type=Path, help="state directory: PKI, keys, audit, run files (default: state_dir)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _stack_commands(sub, common)
    _running_commands(sub, common)
    _tenant_commands(sub, common)
    _policy_commands(sub, common)
    _ops_commands(sub, common)
    _keys_commands(sub, common)
    _lockout_commands(sub, common)
    sub.add_parser("domains", add_help=False, help="list isolation domains (--help for options)")
    sub.add_parser("plan", add_help=False, help="check a model fits a domain (--help for options)")
    completion = sub.add_parser("completion", help="print a shell completion script")
    completion.add_argument("shell", choices=("bash", "zsh"), help="the shell")
    _command(completion, "completion:cmd_completion")
    _format(parser)
    return parser


def _format(parser: argparse.ArgumentParser) -> None:
    """Every parser shows defaults the same way (subparsers do not inherit a formatter)."""
    parser.formatter_class = _Formatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _format(child)


def _stack_commands(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    up = sub.add_parser("up", parents=[common], help="start gateway and workers (foreground, or --detach)")
    up.add_argument("--listen", help="the gateway's TLS address for token callers (default: gateway.listen)")
    up.add_argument(
        "--mtls-listen", help='its service (mTLS) address; "" disables it (default: gateway.mtls_listen)'
    )
    up.add_argument(
        "--metrics-listen", help='its Prometheus address; "" disables it (default: gateway.metrics_listen)'
    )
    up.add_argument("--demo", action="store_true", help="send one demo request per tenant once up")
    up.add_argument(
        "--detach", action="store_true",
        help="run in the background (log in STATE_DIR/run/up.log); `airlock down` stops it",
    )  # fmt: skip
    up.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="the processes' log level")
    up.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for the stack to serve (model loads)"
    )
    _command(up, "stack:cmd_up")

    token = sub.add_parser("token", parents=[common], help="print a development token (JWT)")
    token.add_argument("--tenant", required=True, type=_name, help="the token's tenant claim")
    token.add_argument("--subject", required=True, help="the token's sub claim (a user: alice)")
    token.add_argument(
        "--ttl", type=int, default=3600, help="lifetime in seconds, 1..auth.max_token_lifetime_seconds"
    )
    _command(token, "stack:cmd_token")

    cert = sub.add_parser("cert", parents=[common], help="issue a development service certificate (mTLS)")
    cert.add_argument("--tenant", required=True, type=_name, help="the service's tenant")
    cert.add_argument("--service", required=True, type=_name, help="the service's name")
    cert.add_argument("--out", type=Path, help="directory for the files (default: state_dir/pki/services)")
    cert.add_argument("--days", type=int, default=30, help="validity in days")
    _command(cert, "stack:cmd_cert")

    gen = sub.add_parser("generate", parents=[common], help="stream an answer from the running stack")
    gen.add_argument("prompt", help="the user message")
    gen.add_argument(
        "--tenant", type=_name, help="the tenant to call as (default: the --token's; required without one)"
    )
    gen.add_argument("--subject", default="cli", help="the dev token's subject (its policy name TENANT/cli)")
    gen.add_argument("--token", help="call with this token instead of minting a dev token")
    gen.add_argument("--address", help="gateway HOST:PORT (default: the running stack's)")
    gen.add_argument(
        "--ca", type=Path, help="CA certificate of the gateway (default: the state dir's dev CA)"
    )
    gen.add_argument("--model", default="", help="the model (default: the tenant's first)")
    gen.add_argument("--max-tokens", type=int, default=128, help="at most this many completion tokens")
    gen.add_argument("--temperature", type=float, help="sampling temperature (default: the model's)")
    gen.add_argument("--seed", type=int, help="sampling seed, for repeatable answers")
    gen.add_argument("--timeout", type=float, default=120.0, help="seconds before the call is given up")
    _command(gen, "stack:cmd_generate")


def _running_commands(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    status = sub.add_parser("status", parents=[common], help="the running stack: gateway, workers, tenants")
    status.add_argument("--json", action="store_true", help="print the report as JSON")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the gateway")
    _command(status, "status:cmd_status")

    down = sub.add_parser("down", parents=[common], help="stop the stack running from the state directory")
    down.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for it to stop")
    _command(down, "stack:cmd_down")

    usage = sub.add_parser("usage", parents=[common], help="requests, tokens, refusals per tenant (audit)")
    usage.add_argument("--tenant", type=_name, help="only this tenant")
    usage.add_argument(
        "--since", help="only records since: a duration ago (30m, 2h, 7d) or a time (2025-06-01T12:00)"
    )
    usage.add_argument("--json", action="store_true", help="print the table as JSON")
    _command(usage, "status:cmd_usage")


def _tenant_commands(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    tenant = sub.add_parser("tenant", help="add, remove and list tenants (config and policy files)")
    tsub = tenant.add_subparsers(dest="tenant_command", required=True, metavar="COMMAND")
    edit = argparse.ArgumentParser(add_help=False, parents=[common])
    edit.add_argument("--policy-dir", type=Path, help="the policy directory (default: policy_dir)")
    edit.add_argument(
        "--write", action="store_true", help="apply the changes shown (default: only show them)"
    )

    add = tsub.add_parser("add", parents=[edit], help="add a tenant: config, tenants.toml, policy.csv")
    add.add_argument("name", type=_name, help="the new tenant's name")
    add.add_argument(
        "--model",
        action="append",
        required=True,
        help="a model it may use (repeat; the first: its default)",
    )
    add.add_argument(
        "--issuer",
        action="append",
        help="an issuer that may speak for it (repeat; default: the dev one)",
    )
    add.add_argument("--user", action="append", default=[], help="a subject given the role user (repeat)")
    add.add_argument(
        "--admin", action="append", default=[], help="a subject given the role tenant-admin (repeat)"
    )
    add.add_argument("--requests-per-second", type=float, help="quota: request rate (default: none)")
    add.add_argument(
        "--tokens-per-minute", type=int, help="quota: completion tokens per minute (default: none)"
    )
    add.add_argument("--concurrent-streams", type=int, help="quota: calls in flight (default: none)")
    _command(add, "tenant:cmd_tenant_add")

    remove = tsub.add_parser("remove", parents=[edit], help="remove a tenant from config and policy files")
    remove.add_argument("name", type=_name, help="the tenant to remove")
    _command(remove, "tenant:cmd_tenant_remove")

    listing = tsub.add_parser("list", parents=[edit], help="tenants in config, policy, keystore and serving")
    _command(listing, "tenant:cmd_tenant_list")


def _policy_commands(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    policy = sub.add_parser("policy", help="lint, test and explain a policy directory offline")
    psub = policy.add_subparsers(dest="policy_command", required=True, metavar="COMMAND")
    where = argparse.ArgumentParser(add_help=False, parents=[common])
    where.add_argument(
        "--dir",
        type=Path,
        help="policy directory (default: policy_dir, this installation's: the gateway's)",
    )

    lint = psub.add_parser("lint", parents=[where], help="find risky or mistaken policy lines")
    lint.add_argument("--strict", action="store_true", help="fail on warnings too")
    _command(lint, "policy:cmd_policy_lint")

    test = psub.add_parser("test", parents=[where], help="run every case in tests.yaml")
    _command(test, "policy:cmd_policy_test")

    explain = psub.add_parser("explain", parents=[where], help="explain the decision for one request")
    explain.add_argument("--subject", required=True, help="TENANT/NAME, or a service's SPIFFE ID")
    explain.add_argument("--tenant", required=True, help="the tenant the request acts in")
    explain.add_argument("--resource", required=True, help="e.g. model:NAME, models, admin:OPERATION")
    explain.add_argument("--action", required=True, choices=POLICY_ACTIONS, help="the policy action")
    _command(explain, "policy:cmd_policy_explain")


def _ops_commands(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    audit = sub.add_parser("audit", help="verify the tamper-evident audit trail")
    asub = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
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
    bsub = bundle.add_subparsers(dest="bundle_command", required=True, metavar="COMMAND")
    keygen = bsub.add_parser("keygen", help="make an Ed25519 signing key and its public half")
    keygen.add_argument("--out", type=Path, required=True, help="the private key file to write (+ .pub)")
    _command(keygen, "ops:cmd_bundle_keygen")
    create = bsub.add_parser("create", help="write the manifest of sha256 digests")
    create.add_argument("dir", type=Path, help="the model directory")
    create.add_argument("--name", help="bundle name (default: the directory's)")
    _command(create, "ops:cmd_bundle_create")
    sign = bsub.add_parser("sign", parents=[common], help="sign the manifest")
    sign.add_argument("dir", type=Path, help="the model directory")
    sign.add_argument("--key", type=Path, help="Ed25519 private key (default: the dev bundle key)")
    _command(sign, "ops:cmd_bundle_sign")
    check = bsub.add_parser("verify", parents=[common], help="check signature and every file")
    check.add_argument("dir", help="a bundle directory, or s3://BUCKET/PREFIX (streamed, not kept)")
    check.add_argument("--trusted-keys", type=Path, help="PEM public keys (default: bundles.trusted_keys)")
    _command(check, "ops:cmd_bundle_verify")
    push = bsub.add_parser("push", parents=[common], help="upload a signed bundle to S3 ([s3] in the config)")
    push.add_argument("dir", type=Path, help="the signed bundle directory to upload")
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
    health.add_argument("--address", help="HOST:PORT (default: the running stack's gateway)")
    health.add_argument("--ca", type=Path, help="CA certificate (default: the dev CA)")
    health.add_argument("--server-name", help="TLS name to expect when the address is not it")
    health.add_argument("--cert", type=Path, help="client certificate, for servers that require mTLS")
    health.add_argument("--key", type=Path, help="the client certificate's key")
    health.add_argument(
        "--service", default="",
        help="service name ('' = the whole server; tenant/NAME needs --token or --cert of that tenant)",
    )  # fmt: skip
    health.add_argument("--token", help="a bearer token, for a tenant's own status on the token port")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    _command(health, "ops:cmd_health")


def _keys_commands(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    keys = sub.add_parser("keys", help="create, rotate, list and retire tenant data keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")

    create = ksub.add_parser("create", parents=[common], help="make the first key of a tenant")
    create.add_argument("--tenant", required=True, type=_name, help="a tenant of the config or the policy")
    _command(create, "keys:cmd_keys_create")

    rotate = ksub.add_parser("rotate", parents=[common], help="new active key; old one decrypt-only")
    rotate.add_argument("--tenant", required=True, type=_name, help="the tenant")
    _command(rotate, "keys:cmd_keys_rotate")

    retire = ksub.add_parser("retire", parents=[common], help="destroy a decrypt-only key (irreversible)")
    retire.add_argument("--tenant", required=True, type=_name, help="the tenant")
    retire.add_argument("--key-id", required=True, help="a decrypt-only key, as `keys list` shows it")
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
    lsub = lockout.add_subparsers(dest="lockout_command", required=True, metavar="COMMAND")

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
    args.argv = list(argv)  # `up --detach` starts the same command in the background
    if not args.verbose:
        # Before any command imports grpc: its C core logs connection failures itself ("E0000 ...
        # ssl_transport_security.cc ... Handshake failed"), which the one-line error already says.
        os.environ["GRPC_VERBOSITY"] = "NONE"
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
    from control.runfile import NoRunningStackError
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
    except NoRunningStackError as exc:
        err(str(exc))
        return 1
