"""Refused calls never reach servicer code (a real TLS gateway server, in process)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from airlock import AsyncClient, AuthenticationError, PermissionDeniedError
from airlock.types import Limits
from airlock.v1 import inference_pb2 as pb
from control.pki import ensure_dev_pki
from control.tokens import mint_dev_token
from gateway.audit import AuditLog
from gateway.auth.guard import CallGuard, current_caller
from gateway.auth.identity import JwtVerifier, ServiceIdentity
from gateway.auth.lockout import Lockout
from gateway.config import AuthConfig, LockoutConfig
from gateway.metrics import Metrics
from gateway.policy.authz import Authorizer
from gateway.server import ClientTls, InferenceService, Route, Router, ServerTls, create_server
from tests.conftest import make_policy_dir


class SpyService(InferenceService):
    def __init__(self, router: Router) -> None:
        super().__init__(router, Limits())
        self.calls: list[tuple[str, str]] = []

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        self.calls.append(("Generate", current_caller().tenant))
        return pb.GenerateResponse(request_id="spy", text="ok")

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        self.calls.append(("GenerateStream", current_caller().tenant))
        yield pb.GenerateChunk(request_id="spy", text="ok", finish_reason=pb.FINISH_REASON_STOP)


async def test_servicer_runs_only_for_verified_authorized_callers(tmp_path: Path) -> None:
    pki = ensure_dev_pki(tmp_path)
    auth = AuthConfig()
    metrics = Metrics()
    authorizer = Authorizer.from_directory(make_policy_dir(tmp_path / "policy"), metrics=metrics)
    # Routes are never dialled: the spy answers itself.
    router = Router(
        [Route("acme", "m", "echo", "127.0.0.1:9"), Route("globex", "m", "echo", "127.0.0.1:9")],
        ClientTls(pki.ca_cert, pki.gateway_cert, pki.gateway_key),
    )
    spy = SpyService(router)
    verifier = JwtVerifier(auth, {"airlock-dev": pki.jwks}, lambda iss, t: t in authorizer.policy.tenants)
    guard = CallGuard(
        verifier, ServiceIdentity("airlock.local"), authorizer, Lockout(LockoutConfig(max_failures=0)),
        spy.resources, metrics=metrics, audit=AuditLog(None),
    )  # fmt: skip
    server, port, _, _ = create_server(
        spy, guard, "127.0.0.1:0",
        tls=ServerTls(pki.gateway_cert, pki.gateway_key, pki.service_ca_cert), max_message_bytes=1 << 20,
    )  # fmt: skip
    await server.start()
    try:
        good = mint_dev_token(pki, auth, tenant="acme", subject="tester")
        expired = mint_dev_token(pki, auth, tenant="acme", subject="tester", ttl_seconds=-300)
        for token in (None, "", "abc.def.ghi", expired, good + "x"):
            async with AsyncClient(f"127.0.0.1:{port}", token=token, ca_cert=pki.ca_cert) as client:
                with pytest.raises(AuthenticationError):
                    await client.generate("hi")
                with pytest.raises(AuthenticationError):
                    [c async for c in client.stream("hi")]
        # Verified but not allowed: a subject without a role, or another tenant's.
        stranger = mint_dev_token(pki, auth, tenant="acme", subject="stranger")
        for token, tenant in ((stranger, None), (good, "globex")):
            async with AsyncClient(f"127.0.0.1:{port}", token=token, ca_cert=pki.ca_cert, tenant=tenant) as c:
                with pytest.raises(PermissionDeniedError):
                    await c.generate("hi")
                with pytest.raises(PermissionDeniedError):
                    [x async for x in c.stream("hi")]
        assert spy.calls == []
        async with AsyncClient(f"127.0.0.1:{port}", token=good, ca_cert=pki.ca_cert) as client:
            assert (await client.generate("hi")).text == "ok"
            assert [c.text async for c in client.stream("hi")] == ["ok"]
        assert spy.calls == [("Generate", "acme"), ("GenerateStream", "acme")]
        denied = metrics.registry.get_sample_value(
            "airlock_authz_decisions_total", {"tenant": "globex", "decision": "deny"}
        )
        assert denied == 2
    finally:
        await server.stop(None)
