"""The `airlock` command: run a stack, mint development tokens, send a request.

    airlock up [--config FILE] [--demo]     gateway + one worker per tenant model, in the foreground
    airlock token --tenant T --subject S    print a development JWT signed with the dev key
    airlock generate --tenant T "prompt"    stream an answer, then token counts and latency

Exit codes: 0 success, 1 runtime failure, 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from airlock import AirlockError, Client
from gateway import config as config_mod
from gateway.pki import ensure_dev_pki
from gateway.stack import Stack, StackError
from gateway.tokens import mint_dev_token

DEMO_PROMPT = "In one sentence, what is an air-gapped computer?"


def _err(message: str) -> None:
    print(f"airlock: {message}", file=sys.stderr, flush=True)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _load(args: argparse.Namespace) -> config_mod.Config:
    return config_mod.load(args.config, state_dir=args.state_dir)


def cmd_up(args: argparse.Namespace) -> int:
    cfg = _load(args)
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
        for (tenant, model), child in stack.workers.items():
            print(f"  tenant {tenant}: model {model} in worker pid {child.process.pid}")
        print(f"  logs: {stack.run_dir}")
        print(f'  try:  airlock generate --tenant {next(iter(cfg.tenants))} "Hello"')
        print("Ctrl-C stops everything.", flush=True)
        if args.demo:
            _demo(cfg, stack)
        while not stop.wait(0.5):
            dead = [c for c in stack.children() if c.process.poll() is not None]
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


def cmd_token(args: argparse.Namespace) -> int:
    cfg = _load(args)
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
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    token.set_defaults(func=cmd_token)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except config_mod.ConfigError as exc:
        _err(f"config error: {exc}")
        return 2
