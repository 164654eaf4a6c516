"""`airlock up`, `token`, `cert` and `generate`: a development stack and its clients."""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from typing import Any

from airlock import AirlockError, Client
from control.cli.output import err as _err
from control.launcher import Stack, StackError
from control.pki import ensure_dev_pki, issue_service_cert
from control.tokens import mint_dev_token
from gateway import config as config_mod
from gateway.keys import ensure_tenant_keys, open_keystore

DEMO_PROMPT = "In one sentence, what is an air-gapped computer?"

__all__ = ["cmd_cert", "cmd_generate", "cmd_token", "cmd_up"]


def _load(args: argparse.Namespace) -> config_mod.Config:
    return config_mod.load(args.config, state_dir=args.state_dir)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


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
