"""The router's readiness watch (a real worker health server, mTLS, in process): whatever a reply or
the readiness publisher raises, the watches go on and later flips are still published; a worker is
ready only while it says so and its channel is open."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from airlock.v1 import worker_pb2, worker_pb2_grpc
from control.pki import DevPki, ensure_dev_pki
from gateway.audit import AuditLog
from gateway.routing import ClientTls, Route, Router
from serving.rpc import Health, bind, new_server

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class Channels(worker_pb2_grpc.WorkerServicer):
    """A worker that opens channels (and answers nothing on them); `refuse` ends each at once."""

    def __init__(self) -> None:
        self.refuse = False

    async def Channel(
        self, requests: AsyncIterator[worker_pb2.GatewayFrames], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.WorkerFrames]:
        if self.refuse:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "refused")
        yield worker_pb2.WorkerFrames()
        async for _ in requests:
            pass


async def worker(pki: DevPki, channels: Channels | None) -> tuple[grpc.aio.Server, Health, int]:
    server, health = new_server([], [], max_message_bytes=1 << 20)
    if channels is not None:
        worker_pb2_grpc.add_WorkerServicer_to_server(channels, server)
    credentials = grpc.ssl_server_credentials(
        [(pki.worker_key.read_bytes(), pki.worker_cert.read_bytes())],
        root_certificates=pki.ca_cert.read_bytes(), require_client_auth=True,
    )  # fmt: skip
    port = bind(server, "127.0.0.1:0", credentials)
    await health.set("", SERVING)
    await server.start()
    return server, health, port  # type: ignore[return-value]


def router_for(pki: DevPki, port: int) -> Router:
    return Router(
        [Route("acme", "echo", "echo", f"127.0.0.1:{port}")],
        ClientTls(pki.ca_cert, pki.gateway_cert, pki.gateway_key),
        audit=AuditLog(None),
    )


async def test_a_readiness_watch_survives_a_publisher_that_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki = ensure_dev_pki(tmp_path)
    server, health, port = await worker(pki, Channels())
    router = router_for(pki, port)
    published: asyncio.Queue[bool] = asyncio.Queue()
    broken = 2  # the first two publications fail (e.g. update_health raising)

    async def changed() -> None:
        nonlocal broken
        if broken:
            broken -= 1
            raise RuntimeError("publisher broke")
        await published.put(router.tenant_ready("acme"))

    stop = asyncio.Event()
    caplog.set_level(logging.ERROR, logger="airlock")
    watch = asyncio.create_task(router.watch(stop, changed))
    try:
        while not await asyncio.wait_for(published.get(), 30):  # watched again after the failures
            pass
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
    # the health watch and the channel's keeper each log a failure once, not once per retry
    assert failures and all(f.exc_info is not None for f in failures)
    assert len(failures) == len({f.name for f in failures})


async def test_a_worker_whose_channel_does_not_open_is_not_ready(tmp_path: Path) -> None:
    pki = ensure_dev_pki(tmp_path)
    channels = Channels()
    channels.refuse = True
    server, _health, port = await worker(pki, channels)
    router = router_for(pki, port)
    published: asyncio.Queue[bool] = asyncio.Queue()

    async def changed() -> None:
        await published.put(router.tenant_ready("acme"))

    stop = asyncio.Event()
    watch = asyncio.create_task(router.watch(stop, changed))
    try:
        assert await asyncio.wait_for(published.get(), 30) is False  # health says SERVING
        await asyncio.sleep(0.5)
        assert not router.tenant_ready("acme") and published.empty()
        channels.refuse = False  # the channel is opened again (with backoff) once the worker takes it
        assert await asyncio.wait_for(published.get(), 30) is True
    finally:
        stop.set()
        await watch
        await router.close()
        await server.stop(None)
