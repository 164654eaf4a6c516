"""`airlock status` (what a running stack does) and `airlock usage` (who used what, from the audit).

`status` merges two views: the launcher's, from the run file (each worker's tenant, model, domain,
pid, uptime, restarts), and the gateway's, asked over its admin socket (policy generation and last
reload, routes and readiness, tenants' key ids and quota use, lockouts).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from airlock.rpcstatus import from_rpc_error
from airlock.v1 import admin_pb2, admin_pb2_grpc
from control.cli.output import duration, err, table
from control.runfile import find_running
from control.usage import parse_since, usage
from gateway import config as config_mod

__all__ = ["cmd_status", "cmd_usage"]


def gateway_status(socket: Path, timeout: float) -> tuple[admin_pb2.StatusResponse | None, str]:
    """The gateway's own report over its admin socket, or None and why there is none."""
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        try:
            reply = admin_pb2_grpc.AdminStub(channel).Status(admin_pb2.StatusRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return None, f"the gateway does not answer on its admin socket {socket}"
            failure = from_rpc_error(exc)
            return None, f"{failure.message} [{failure.reason}]"
    return reply, ""


def cmd_status(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config, state_dir=args.state_dir)
    running = find_running(cfg.state_dir)
    info = running.info
    gateway, why = (None, "the admin socket is disabled (gateway.admin_socket)")
    if running.admin_socket is not None:
        gateway, why = gateway_status(running.admin_socket, args.timeout)
    if args.json:
        report = {"launcher": info, "gateway": MessageToDict(gateway) if gateway else None, "problem": why}
        print(json.dumps(report, indent=1, sort_keys=True))
        return 0 if gateway is not None else 1
    _print_launcher(info)
    if gateway is None:
        err(why)
        _print_workers(info, None)
        return 1
    _print_gateway(info, gateway)
    _print_workers(info, gateway)
    _print_tenants(gateway)
    return 0


def _ago(unix: float) -> str:
    return duration(time.time() - unix)


def _print_launcher(info: dict[str, Any]) -> None:
    print(f"stack of {info['state_dir']}: launcher pid {info['pid']}, up {_ago(info['started'])}, "
          f"config {info['config']}")  # fmt: skip


def _print_gateway(info: dict[str, Any], gw: admin_pb2.StatusResponse) -> None:
    serving = "SERVING" if gw.serving else "NOT SERVING (a tenant has no ready worker)"
    ports = [f"{info['address']} (TLS)"]
    if info.get("mtls_address"):
        ports.append(f"{info['mtls_address']} (mTLS)")
    print(f"gateway:  pid {gw.pid}, up {duration(gw.uptime_seconds)}, {serving}; {', '.join(ports)}")
    if len(gw.processes) > 1:  # gateway.processes: the others, on the same ports
        print(f"          {len(gw.processes)} processes: " + "; ".join(_process(p) for p in gw.processes))
    if info.get("metrics_url"):
        print(f"metrics:  {info['metrics_url']}")
    policy = gw.policy
    last = "no reload yet"
    if policy.last_reload:
        last = f"last reload {policy.last_reload} {duration(time.time() - policy.last_reload_unix)} ago"
        if policy.last_reload == "rejected":
            last += f": {policy.last_reload_reason}"
    lint = f", {policy.lint_warnings} lint warning(s)" if policy.lint_warnings else ""
    print(f"policy:   {policy.directory}: generation {policy.generation} ({policy.rules} rules, "
          f"{policy.links} role links{lint}); {last}")  # fmt: skip
    print(f"lockouts: {gw.lockouts} locked, {gw.lockout_failures} with recent failures"
          + (" (`airlock lockout list`)" if gw.lockouts or gw.lockout_failures else ""))  # fmt: skip


def _process(p: admin_pb2.GatewayProcess) -> str:
    if not p.pid:
        return f"#{p.index} not running (restarts {p.restarts})"
    state = "serving" if p.serving else "NOT SERVING"
    metrics = f", metrics :{p.metrics_port}" if p.metrics_port else ""
    restarts = f", restarts {p.restarts}" if p.restarts else ""
    return f"#{p.index} pid {p.pid} {state}{metrics}{restarts}"


def _print_workers(info: dict[str, Any], gw: admin_pb2.StatusResponse | None) -> None:
    routes: dict[str, list[admin_pb2.RouteStatus]] = {}
    for status in gw.routes if gw else []:
        routes.setdefault(status.route.address, []).append(status)
    rows = []
    for w in info.get("workers", []):
        routed = routes.get(f"127.0.0.1:{w.get('port')}", [])
        ready = "-" if gw is None else ("ready" if any(r.ready for r in routed) else "not ready")
        if gw is not None and not routed:
            ready = "not routed"
        domain = ",".join(w.get("devices") or []) or "cpu"
        rows.append((", ".join(w["tenants"]), w["model"], w["engine"], domain, w["pid"],
                     duration(time.time() - w["started"]), w["restarts"], w["state"], ready))  # fmt: skip
    header = ("TENANT", "MODEL", "ENGINE", "DOMAIN", "PID", "UPTIME", "RESTARTS", "STATE", "ROUTE")
    print()
    table(header, rows, title="workers")


def _print_tenants(gw: admin_pb2.StatusResponse) -> None:
    rows = []
    for t in gw.tenants:
        keys = ", ".join(f"{k.key_id} ({k.state})" for k in t.keys if k.state != "retired") or "none"
        limits = "/".join(
            str(v) if v else "-"
            for v in (_number(t.requests_per_second), t.tokens_per_minute, t.concurrent_streams)
        )
        tokens = t.prompt_tokens + t.completion_tokens
        rows.append((t.name, "yes" if t.in_policy else "NO", keys, t.in_flight, t.requests_ok,
                     t.requests_failed, t.quota_refusals, tokens, limits))  # fmt: skip
    header = ("TENANT", "IN POLICY", "KEYS", "IN FLIGHT", "OK", "FAILED", "QUOTA REFUSED", "TOKENS",
              "QUOTA rps/tpm/streams")  # fmt: skip
    print()
    table(header, rows, title="tenants (since the gateway started)")


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def cmd_usage(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config, state_dir=args.state_dir)
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        err(f"usage: --since {exc}")
        return 2
    report = usage(cfg.audit_path, tenant=args.tenant, since=since)
    if not report.files:
        err(f"usage: no audit trail at {cfg.audit_path} (a stack of this state directory writes it)")
        return 1
    if args.json:
        print(json.dumps({
            "since": since, "files": [str(f) for f in report.files],
            "tenants": [t.as_dict() for t in report.tenants.values()],
            "unauthenticated": report.unauthenticated,
        }, indent=1))  # fmt: skip
        return 0
    window = f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else "all records"
    rows = [
        (t.tenant, t.requests, t.ok, t.failed, t.quota_refused, t.denied, t.rate_limited, t.prompt_tokens,
         t.completion_tokens)
        for t in report.tenants.values()
    ]  # fmt: skip
    header = ("TENANT", "REQUESTS", "OK", "FAILED", "QUOTA REFUSED", "DENIED", "RATE LIMITED",
              "PROMPT TOKENS", "COMPLETION TOKENS")  # fmt: skip
    table(header, rows, title=f"usage from {cfg.audit_path} ({window})")
    if not rows:
        print(f"no calls{' of tenant ' + args.tenant if args.tenant else ''} in that window")
    if args.tenant is None:
        print(f"refused before any identity was verified (no tenant): {report.unauthenticated}")
    return 0
