"""Slowloris-style clients against a live gateway: streams opened and never read, TCP connections
that never finish (or never start) their TLS handshake, and pings far too often. A normal client
must keep being served, the idle handshakes must be closed (serving/rpc.py bounds them), and
the gateway's memory must stay bounded."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import grpc
import pytest

from airlock import QuotaExceededError
from airlock.v1 import inference_pb2 as pb
from airlock.v1 import inference_pb2_grpc
from tests.conftest import ECHO_TOML
from tests.reliability.load import Load, rss_kib, wait_until
from tests.support import LiveStack

HOLDERS = 200  # streams that are opened and never read, each on its own connection
SILENT = 200  # TCP connections that send nothing at all
PARTIAL = 50  # TCP connections that send the first bytes of a TLS record, then nothing
# The normal clients' calls/s: the repository's policy applies here (its stream limit is part of
# the test) and lets each tenant make 200 calls/s; unpaced, a fast gateway would run into that.
PACE = 100.0
LONG_PROMPT = " ".join(f"w{i}" for i in range(600))  # 512 tokens at 20/s: a 25 s stream


def gateway_pid(live: LiveStack) -> int:
    assert live.stack.gateway is not None
    return live.stack.gateway.process.pid


def normal_channel(live: LiveStack, **options: int) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(live.pki.ca_cert.read_bytes())
    return grpc.aio.secure_channel(live.address, credentials, options=list(options.items()))


async def test_streams_held_open_and_never_read(make_stack: Callable[[str], LiveStack]) -> None:
    """The repository's policy applies: acme may hold 64 streams, so acme's own extra calls are
    refused (RESOURCE_EXHAUSTED) while another tenant is served as usual."""
    live = make_stack(ECHO_TOML)
    pid = gateway_pid(live)
    before = rss_kib(pid)
    metadata = (("authorization", f"Bearer {live.token('acme')}"),)
    request = pb.GenerateRequest(model="slow", messages=[pb.ChatMessage(role="user", content=LONG_PROMPT)])
    request.params.max_tokens = 512
    channels = [normal_channel(live) for _ in range(HOLDERS)]
    try:
        # Each call starts at once; nobody ever reads from it.
        calls = [
            inference_pb2_grpc.InferenceStub(ch).GenerateStream(request, metadata=metadata, timeout=120)
            for ch in channels
        ]
        await asyncio.sleep(2.0)
        async with Load(live, tenants=("globex",), concurrency=4, rate=PACE) as load:
            await asyncio.sleep(3.0)
            async with live.client("acme") as acme:
                with pytest.raises(QuotaExceededError) as held:
                    await acme.generate("me too", model="echo", timeout=10)
            peak = rss_kib(pid)
        assert held.value.reason == "CONCURRENCY_LIMITED"
        assert not load.errors() and len(load.ok()) > 0  # the other tenant did not notice
        growth_mib = (peak - before) / 1024
        print(f"\nslowloris streams: gateway RSS {before / 1024:.0f} -> {peak / 1024:.0f} MiB")
        assert growth_mib < 256, growth_mib  # bounded: 200 held streams cost a little, not a lot
        for call in calls:
            call.cancel()
    finally:
        for ch in channels:
            await ch.close()
    # Once the holders are gone, acme's slots come back.
    async with live.client("acme") as acme:
        end = time.monotonic() + 30
        while True:
            try:
                assert (await acme.generate("free again", model="echo", timeout=10)).text == "free again"
                break
            except QuotaExceededError:
                assert time.monotonic() < end, "acme's stream slots never came back"
                await asyncio.sleep(0.2)


def _closed(sock: socket.socket) -> bool:
    """True once the peer has closed the connection (EOF or reset); False while it is open."""
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


async def test_silent_connections_and_ping_floods(make_stack: Callable[[str], LiveStack]) -> None:
    live = make_stack(ECHO_TOML)
    host, port = live.address.rsplit(":", 1)
    pid = gateway_pid(live)
    before = rss_kib(pid)
    sockets: list[socket.socket] = []
    try:
        for i in range(SILENT + PARTIAL):
            sock = socket.create_connection((host, int(port)), timeout=10)
            if i >= SILENT:  # a TLS handshake record header, and then nothing more
                sock.sendall(b"\x16\x03\x01\x02\x00\x01")
            sock.setblocking(False)
            sockets.append(sock)
        # A client that pings every 100 ms, also with no call open: the server allows one ping
        # per 10 s without data; after two strikes it sends GOAWAY and closes the connection.
        options = {
            "grpc.keepalive_time_ms": 100,
            "grpc.keepalive_timeout_ms": 1000,
            "grpc.keepalive_permit_without_calls": 1,
            "grpc.http2.max_pings_without_data": 0,
        }
        pinger = normal_channel(live, **options)
        async with pinger, Load(live, concurrency=4, rate=PACE) as load:
            health = pinger.unary_unary("/grpc.health.v1.Health/Check")
            await health(b"", timeout=10)  # connected and READY
            assert pinger.get_state() == grpc.ChannelConnectivity.READY
            await wait_until(
                lambda: pinger.get_state() != grpc.ChannelConnectivity.READY, 30, "the ping flood closed"
            )
            # The silent handshakes are closed by the server (10 s handshake timeout).
            await wait_until(lambda: all(_closed(s) for s in sockets), 40, "idle handshakes closed")
            peak = rss_kib(pid)
        assert not load.errors(), load.errors()
        assert load.by_tenant()["acme"] > 0 and load.by_tenant()["globex"] > 0
        print(f"\nsilent connections: gateway RSS {before / 1024:.0f} -> {peak / 1024:.0f} MiB")
        assert (peak - before) / 1024 < 256
    finally:
        for sock in sockets:
            sock.close()
