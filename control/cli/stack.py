"""`airlock up`, `down`, `token`, `cert` and `generate`: a development stack and its clients.

Every client command finds the stack through the state directory's run file (control/runfile.py):
nothing falls back to a default address, and nothing makes a new PKI behind the operator's back.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from airlock import AirlockError, Client, QuotaExceededError
from control.cli.output import err as _err
from control.events import AuditFollower
from control.launcher import Stack, StackError
from control.pki import DevPki, existing_dev_pki, issue_service_cert
from control.reconcile import reconcile
from control.runfile import NoRunningStackError, Running, find_running, is_launcher, process_alive, read
from control.tokens import mint_dev_token
from gateway import config as config_mod
from gateway.config.isolation import SHARED, shared_models
from gateway.keys import ensure_tenant_keys, open_keystore

DEMO_PROMPT = "In one sentence, what is an air-gapped computer?"
DETACHED = "AIRLOCK_DETACHED"  # set in the environment of the launcher `up --detach` starts
UP_LOG = "up.log"
# Reasons of a connection that never reached a gateway (airlock/connection.py).
CONNECTION_REASONS = frozenset({
    "CONNECT_REFUSED", "ADDRESS_UNRESOLVED", "TLS_NOT_SPOKEN", "TLS_UNTRUSTED", "TLS_NAME_MISMATCH",
    "TLS_CLIENT_CERT_REQUIRED", "TLS_CLIENT_CERT_REFUSED", "UNAVAILABLE",
})  # fmt: skip

__all__ = ["cmd_cert", "cmd_down", "cmd_generate", "cmd_token", "cmd_up", "describe_error"]


def _load(args: argparse.Namespace) -> config_mod.Config:
    return config_mod.load(args.config, state_dir=args.state_dir)


def _pki(cfg: config_mod.Config) -> DevPki:
    """The development PKI `airlock up` made in this state directory; never a new one."""
    pki = existing_dev_pki(cfg.state_dir)
    if pki is None:
        raise NoRunningStackError(
            f"no development PKI in {cfg.state_dir / 'pki'}: `airlock up` makes one (or pass the "
            "--state-dir of the stack you started)"
        )
    return pki


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


# -- up ---------------------------------------------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if args.detach:
        return _detach(args, cfg)
    for made in ensure_tenant_keys(open_keystore(cfg.keys, cfg.state_dir), cfg.tenants):
        _err(f"created key {made.key_id} for tenant {made.tenant} ({made.backend} keystore)")
    stack = Stack(
        cfg, listen=args.listen, mtls_listen=args.mtls_listen, metrics_listen=args.metrics_listen,
        log_level=args.log_level, events=_err,
    )  # fmt: skip
    _log_to(stack.run_dir / "launcher.log", args.log_level)
    # While starting, Ctrl-C or SIGTERM interrupts the start (which stops what it started);
    # once up, they ask the loop below to stop everything in order.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    bundled = any(m.path == "bundled" and m.engine != "echo" for m in cfg.models.values())
    _err(
        f"starting {_workers(cfg)} worker(s) and the gateway (state: {cfg.state_dir})"
        + ("; the first start converts the bundled model, ~30 s" if bundled else "")
    )
    began = time.monotonic()
    try:
        stack.start(timeout=args.timeout, progress=lambda line: _err(f"{line} ({_elapsed(began)})"))
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
        _summary(cfg, stack, began)
        if args.demo:
            _demo(cfg, stack)
        return _serve(cfg, stack, stop, args)
    finally:
        _err("stopping…")
        stack.stop()
        _err("stopped")


def _log_to(path: Path, level: str) -> None:
    """The launcher's own log lines (supervisor, reconcile) go to run/launcher.log as JSON; the
    terminal gets the one-line events instead."""
    import logging

    from serving.logs import JsonFormatter

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    handler = logging.FileHandler(path)
    handler.setFormatter(JsonFormatter("launcher"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _workers(cfg: config_mod.Config) -> int:
    dedicated = sum(len(t.models) for t in cfg.tenants.values() if t.isolation == "dedicated")
    return dedicated + len(shared_models(cfg))


def _elapsed(began: float) -> str:
    return f"{time.monotonic() - began:.0f} s"


def _summary(cfg: config_mod.Config, stack: Stack, began: float) -> None:
    state = stack.state()
    print(
        f"Airlock is up in {_elapsed(began)}: gateway on {stack.address} (TLS; CA certificate {state['ca']})"
    )
    if stack.mtls_address:
        print(f"  services (mTLS, certificates from `airlock cert`): {stack.mtls_address}")
    for name in ("metrics_url", "supervisor_metrics_url"):
        if state[name]:
            print(f"  {'metrics' if name == 'metrics_url' else 'supervisor metrics'}: {state[name]}")
    print(f"  policy: {cfg.policy_dir} (watched: reloads, rejected ones too, are reported here)")
    if cfg.source != "<defaults>":
        print(f"  config: {cfg.source} (watched: tenants added or removed there start or stop here)")
    for (tenant, model), child in stack.workers.items():
        who = ", ".join(child.info.get("tenants") or [tenant])  # a shared worker serves several
        print(f"  tenant {who}: model {model} in worker pid {child.process.pid}")
    print(f"  logs: {stack.run_dir}; audit: {cfg.audit_path.parent}")
    print(f'  try:  airlock generate --tenant {next(iter(cfg.tenants))} "Hello"; airlock status')
    if os.environ.get(DETACHED):
        print("`airlock down` stops everything.", flush=True)
    else:
        print("Ctrl-C stops everything (or `airlock down` from another terminal).", flush=True)


def _serve(cfg: config_mod.Config, stack: Stack, stop: threading.Event, args: argparse.Namespace) -> int:
    """Until stopped: report the gateway's events, follow config and policy edits, and end if the
    gateway dies (or a worker, when restarts are off)."""
    follower = AuditFollower(cfg.audit_path)
    watched = _Watched(cfg)
    while not stop.wait(0.5):
        for line in follower.lines():
            _err(line)
        changed = watched.changed()
        # The configuration changed, or the policy did while a tenant waits for it to be routed.
        if "config" in changed or ("policy" in changed and _unrouted(stack)):
            _apply(stack, args)
        watch = stack.children() if not cfg.supervisor.restart else [stack.gateway]
        dead = [c for c in watch if c is not None and c.process.poll() is not None]
        if dead:
            _err(
                f"{dead[0].name} (pid {dead[0].process.pid}) exited unexpectedly (code "
                f"{dead[0].process.returncode}); its log ends with:\n{dead[0].log_tail()}"
            )
            return 1
    return 0


class _Watched:
    """The configuration file and the policy directory: whether either changed since last asked."""

    def __init__(self, cfg: config_mod.Config) -> None:
        self.paths = [Path(cfg.source)] if cfg.source != "<defaults>" else []
        self.policy = cfg.policy_dir
        self.seen = self._stamp()

    def _stamp(self) -> dict[str, tuple[tuple[str, int, int], ...]]:
        policy = sorted(p for p in self.policy.iterdir() if p.is_file())
        return {"config": _stat(self.paths), "policy": _stat(policy)}

    def changed(self) -> set[str]:
        """ "config" and/or "policy": what changed since the last call."""
        try:
            now = self._stamp()
        except OSError:
            return set()
        changed = {name for name, stamp in now.items() if stamp != self.seen[name]}
        self.seen = now
        return changed


def _stat(paths: list[Path]) -> tuple[tuple[str, int, int], ...]:
    out = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            continue
        out.append((str(path), st.st_mtime_ns, st.st_size))
    return tuple(out)


def _unrouted(stack: Stack) -> bool:
    routed = {r.tenant for r in stack.routes_in_service}
    return any(key[0] != SHARED and key[0] not in routed for key in stack.workers)


def _apply(stack: Stack, args: argparse.Namespace) -> None:
    """Serve the tenants of the configuration file as it is now; what can't change live is named."""
    try:
        new = _load(args)
    except config_mod.ConfigError as exc:
        _err(f"configuration change rejected (the running tenants stay as they are): {exc}")
        return
    try:
        done = reconcile(stack, new, say=_err)
    except StackError as exc:
        _err(f"tenant change failed: {exc}")
        return
    if done.started or done.stopped:
        _err(
            f"tenants now served: {', '.join(new_tenants(stack))} (started "
            f"{', '.join(done.started) or 'none'}; stopped {', '.join(done.stopped) or 'none'})"
        )
    if done.unrouted:
        _err(
            f"not routed yet: {', '.join(done.unrouted)}: the policy in service does not list them "
            f"({stack.config.policy_dir / 'tenants.toml'}); they are routed once it does"
        )
    if done.restart_needed:
        _err(f"changed, needs a restart to apply: {', '.join(done.restart_needed)}")


def new_tenants(stack: Stack) -> list[str]:
    return sorted({key[0] for key in stack.workers})


def _demo(cfg: config_mod.Config, stack: Stack) -> None:
    pki = _pki(cfg)
    for tenant in cfg.tenants:
        token = mint_dev_token(pki, cfg.auth, tenant=tenant, subject="demo")
        with Client(stack.address, token=token, ca_cert=pki.ca_cert) as client:
            answer = client.generate(DEMO_PROMPT, max_tokens=64, temperature=0.0)
        print(
            f"[{tenant}] {DEMO_PROMPT}\n[{tenant}] {answer.model}: {answer.text.strip()}\n"
            f"[{tenant}] ({answer.prompt_tokens} prompt + {answer.completion_tokens} completion tokens)",
            flush=True,
        )


def _detach(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    """Start `airlock up` as a daemon (its own session, output in run/up.log) and return once it
    serves, or say why it did not."""
    _, info = read(cfg.state_dir)
    if info is not None and process_alive(info["pid"]):
        _err(f"a stack already runs from {cfg.state_dir} (launcher pid {info['pid']}): `airlock status`, "
             "`airlock down`")  # fmt: skip
        return 1
    run_dir = cfg.state_dir / "run"
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    log = run_dir / UP_LOG
    argv = [a for a in args.argv if a != "--detach"]
    with log.open("ab") as out:
        start = out.tell()
        process = subprocess.Popen(
            [sys.executable, "-m", "control.cli", *argv],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, DETACHED: "1", "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    deadline = time.monotonic() + args.timeout + 60
    shown = start
    while True:
        shown = _show(log, shown)
        _, info = read(cfg.state_dir)
        if info is not None and info.get("pid") == process.pid:
            _show(log, shown)
            print(f"running in the background: launcher pid {process.pid}, log {log}")
            print("`airlock status` shows it, `airlock down` stops it.")
            return 0
        if process.poll() is not None:
            _show(log, shown)
            _err(f"the stack did not start (code {process.returncode}); its log is {log}")
            return 1
        if time.monotonic() > deadline:
            _err(f"the stack is still starting after {args.timeout:.0f} s (pid {process.pid}); log: {log}")
            return 1
        time.sleep(0.2)


def _show(log: Path, offset: int) -> int:
    """Copy what the daemon logged since `offset` to our stderr (stdout lines too); the new offset."""
    try:
        with log.open("rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError:
        return offset
    whole = data[: data.rfind(b"\n") + 1]
    if whole:
        sys.stderr.write(whole.decode(errors="replace"))
        sys.stderr.flush()
    return offset + len(whole)


# -- down -------------------------------------------------------------------------------------------
def cmd_down(args: argparse.Namespace) -> int:
    cfg = _load(args)
    running = find_running(cfg.state_dir)
    pid = running.pid
    if not is_launcher(pid):
        _err(f"pid {pid} in {running.path} is not an `airlock up`; the run file is stale: remove it")
        return 1
    _err(f"stopping the stack of {cfg.state_dir} (launcher pid {pid}, gateway {running.address})…")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while process_alive(pid):
        if time.monotonic() > deadline:
            _err(f"still stopping after {args.timeout:.0f} s (pid {pid}); `airlock down` again waits longer")
            return 1
        time.sleep(0.1)
    leftover = running.path.exists() and read(cfg.state_dir)[1] == running.info
    print(f"stopped (launcher pid {pid}){'; its run file was left behind' if leftover else ''}")
    return 0


# -- credentials ------------------------------------------------------------------------------------
def cmd_cert(args: argparse.Namespace) -> int:
    cfg = _load(args)
    pki = _pki(cfg)
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
    print(mint_dev_token(_pki(cfg), cfg.auth, tenant=args.tenant, subject=args.subject, ttl_seconds=args.ttl))
    return 0


# -- generate ---------------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    cfg = _load(args)
    tenant = _tenant(args)
    if tenant is None:
        return 2
    running: Running | None = None
    if args.address is None:
        running = find_running(cfg.state_dir)
        if running.tenants and tenant not in running.tenants:
            _err(f"tenant {tenant!r} is not served by the stack in {cfg.state_dir} (its tenants: "
                 f"{', '.join(running.tenants)})")  # fmt: skip
            return 2
    address = args.address or (running.address if running else "")
    ca = args.ca or (Path(running.info["ca"]) if running and running.info.get("ca") else _pki(cfg).ca_cert)
    token = args.token or mint_dev_token(_pki(cfg), cfg.auth, tenant=tenant, subject=args.subject)
    params: dict[str, Any] = {"model": args.model, "max_tokens": args.max_tokens}
    if args.temperature is not None:
        params["temperature"] = args.temperature
    if args.seed is not None:
        params["seed"] = args.seed
    start = time.perf_counter()
    first: float | None = None
    printed = False
    try:
        with Client(address, token=token, ca_cert=ca) as client:
            for chunk in client.stream(args.prompt, timeout=args.timeout, **params):
                if first is None and chunk.text:
                    first = time.perf_counter() - start
                print(chunk.text, end="", flush=True)
                printed = printed or bool(chunk.text)
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
        if printed:
            print()
        _err(describe_error(exc, ca=ca, state_dir=cfg.state_dir))
        return 1
    return 0


def _tenant(args: argparse.Namespace) -> str | None:
    """The tenant to call as: --tenant, else the --token's; a token of another tenant is refused."""
    claimed = _token_tenant(args.token) if args.token else None
    if args.tenant is None and claimed is None:
        _err("generate: name the tenant (--tenant), or pass a --token that carries one")
        return None
    if args.tenant is not None and claimed is not None and claimed != args.tenant:
        _err(f"generate: the token is for tenant {claimed!r}, not {args.tenant!r} (--tenant): pass a token "
             f"of {args.tenant}, or leave --tenant out")  # fmt: skip
        return None
    return str(args.tenant or claimed)


def _token_tenant(token: str) -> str | None:
    """The tenant a token claims, read without verifying it (the gateway verifies)."""
    import jwt

    try:
        tenant = jwt.decode(token, options={"verify_signature": False}).get("tenant")
    except jwt.PyJWTError:
        return None
    return tenant if isinstance(tenant, str) else None


def describe_error(exc: AirlockError, *, ca: Path | None = None, state_dir: Path | None = None) -> str:
    """One line: what failed and why, the request id to quote, and when to retry."""
    head = "cannot reach the gateway" if exc.reason in CONNECTION_REASONS else "request failed"
    line = f"{head}: {exc.code.name} {exc.reason}: {exc.message}"
    if exc.reason == "TLS_UNTRUSTED" and state_dir is not None:
        line += f" (the development CA of {state_dir} is {state_dir / 'pki' / 'ca.crt'}"
        line += f"; this call trusted {ca})" if ca else ")"
    extra = [f"request id {exc.request_id}"] if exc.request_id else []
    if isinstance(exc, QuotaExceededError) and exc.retry_after is not None:
        extra.append(f"retry after {exc.retry_after:.1f} s")
    return f"{line} ({'; '.join(extra)})" if extra else line
