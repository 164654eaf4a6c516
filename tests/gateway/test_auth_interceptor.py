"""Unauthenticated calls never reach servicer code (a real TLS gateway server, in process)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from airlock import AsyncClient, AuthenticationError
from airlock.types import Limits
from airlock.v1 import inference_pb2 as pb
from gateway.config import AuthConfig
from gateway.identity import JwtVerifier, current_principal
from gateway.pki import ensure_dev_pki
from gateway.server import ClientTls, InferenceService, Router, create_server
from gateway.tokens import mint_dev_token


class SpyService(InferenceService):
    def __init__(self, router: Router) -> None:
        super().__init__(router, Limits())
        self.calls: list[tuple[str, str]] = []

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        self.calls.append(("Generate", current_principal().tenant))
        return pb.GenerateResponse(request_id="spy", text="ok")

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        self.calls.append(("GenerateStream", current_principal().tenant))
        yield pb.GenerateChunk(request_id="spy", text="ok", finish_reason=pb.FINISH_REASON_STOP)


async def test_servicer_runs_only_for_verified_callers(tmp_path: Path) -> None:
    pki = ensure_dev_pki(tmp_path)
    auth = AuthConfig()
    router = Router([], ClientTls(pki.ca_cert, pki.gateway_cert, pki.gateway_key))
    spy = SpyService(router)
    server, port, _ = create_server(
        spy, JwtVerifier(auth, pki.jwks), "127.0.0.1:0",
        cert=pki.gateway_cert, key=pki.gateway_key, max_message_bytes=1 << 20,
    )  # fmt: skip
    await server.start()
    try:
        good = mint_dev_token(pki, auth, tenant="acme", subject="s")
        expired = mint_dev_token(pki, auth, tenant="acme", subject="s", ttl_seconds=-300)
        for token in (None, "", "abc.def.ghi", expired, good + "x"):
            async with AsyncClient(f"127.0.0.1:{port}", token=token, ca_cert=pki.ca_cert) as client:
                with pytest.raises(AuthenticationError):
                    await client.generate("hi")
                with pytest.raises(AuthenticationError):
                    [c async for c in client.stream("hi")]
        assert spy.calls == []
        async with AsyncClient(f"127.0.0.1:{port}", token=good, ca_cert=pki.ca_cert) as client:
            assert (await client.generate("hi")).text == "ok"
            assert [c.text async for c in client.stream("hi")] == ["ok"]
        assert spy.calls == [("Generate", "acme"), ("GenerateStream", "acme")]
    finally:
        await server.stop(None)
