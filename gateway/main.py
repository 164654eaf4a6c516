"""Gateway process entry point: `python -m gateway --config FILE --route ...` (started by `airlock up`).

The launcher starts the workers first and passes their addresses as routes; the gateway writes a
ready file once it serves, and on SIGTERM stops taking calls and lets in-flight ones finish within
the configured grace period.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from pathlib import Path

from grpc_health.v1 import health_pb2

from airlock import logs
from gateway import config as config_mod
from gateway.identity import JwtVerifier
from gateway.pki import ensure_dev_pki
from gateway.server import SERVICE, ClientTls, InferenceService, Route, Router, create_server

_log = logging.getLogger("airlock.gateway")


def parse_route(text: str) -> Route:
    """TENANT/MODEL/ENGINE=HOST:PORT"""
    left, sep, address = text.partition("=")
    parts = left.split("/")
    if not sep or len(parts) != 3 or not address:
        raise argparse.ArgumentTypeError(f"route must be TENANT/MODEL/ENGINE=HOST:PORT, got {text!r}")
    return Route(parts[0], parts[1], parts[2], address)


async def serve(cfg: config_mod.Config, routes: list[Route], listen: str, ready_file: Path | None) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    pki = ensure_dev_pki(cfg.state_dir)
    verifier = JwtVerifier(cfg.auth, cfg.auth.jwks_file or pki.jwks)
    router = Router(routes, ClientTls(ca=pki.ca_cert, cert=pki.gateway_cert, key=pki.gateway_key))
    service = InferenceService(router, cfg.gateway.limits)
    server, port, health = create_server(
        service,
        verifier,
        listen,
        cert=pki.gateway_cert,
        key=pki.gateway_key,
        max_message_bytes=cfg.gateway.max_message_bytes,
    )
    await server.start()
    await health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    if ready_file is not None:
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"port": port, "pid": os.getpid()}))
        tmp.replace(ready_file)
    _log.info("gateway ready", extra={"port": port})
    await stopping.wait()
    _log.info("gateway draining", extra={"elapsed_s": cfg.gateway.grace_seconds})
    await health.enter_graceful_shutdown()
    await server.stop(cfg.gateway.grace_seconds)
    await router.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    p.add_argument("--config", type=Path)
    p.add_argument("--state-dir", type=Path)
    p.add_argument("--route", type=parse_route, action="append", default=[], required=True)
    p.add_argument("--listen", help="override gateway.listen (e.g. 127.0.0.1:0 in tests)")
    p.add_argument("--ready-file", type=Path)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logs.configure("gateway", args.log_level)
    try:
        cfg = config_mod.load(args.config, state_dir=args.state_dir)
    except config_mod.ConfigError as exc:
        _log.error("bad configuration: %s", exc)
        return 2
    try:
        asyncio.run(serve(cfg, args.route, args.listen or cfg.gateway.listen, args.ready_file))
    except Exception:
        _log.exception("gateway failed")
        return 1
    return 0
