"""The router's readiness watch (a real worker health server, mTLS, in process): whatever a reply or
the readiness publisher raises, the watch goes on and later flips are still published."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from control.pki import ensure_dev_pki
from gateway.audit import AuditLog
from gateway.routing import ClientTls, Route, Router
from serving.rpc import bind, new_server

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def test_a_readiness_watch_survives_a_publisher_that_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki = ensure_dev_pki(tmp_path)
    server, health = new_server([], [], max_message_bytes=1 << 20)
    credentials = grpc.ssl_server_credentials(
        [(pki.worker_key.read_bytes(), pki.worker_cert.read_bytes())],
        root_certificates=pki.ca_cert.read_bytes(), require_client_auth=True,
    )  # fmt: skip
    port = bind(server, "127.0.0.1:0", credentials)
    await health.set("", SERVING)
    await server.start()
    router = Router(
        [Route("acme", "echo", "echo", f"127.0.0.1:{port}")],
        ClientTls(pki.ca_cert, pki.gateway_cert, pki.gateway_key),
        audit=AuditLog(None),
    )
    published: asyncio.Queue[bool] = asyncio.Queue()
    broken = 2  # the first two publications fail (e.g. update_health raising)

    async def changed() -> None:
        nonlocal broken
        if broken:
            broken -= 1
            raise RuntimeError("publisher broke")
        await published.put(router.tenant_ready("acme"))

    stop = asyncio.Event()
    caplog.set_level(logging.ERROR, logger="airlock.routing")
    watch = asyncio.create_task(router.watch(stop, changed))
    try:
        assert await asyncio.wait_for(published.get(), 30) is True  # watched again after the failures
        await health.set("", NOT_SERVING)
        assert await asyncio.wait_for(published.get(), 30) is False
        await health.set("", SERVING)
        assert await asyncio.wait_for(published.get(), 30) is True
    finally:
        stop.set()
        await watch
        await router.close()
        await server.stop(None)
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 1 and failures[0].exc_info is not None  # once, not once per retry
