"""Test support: a running stack plus what tests need to talk to it and to its workers."""

from __future__ import annotations

import grpc

from airlock import AsyncClient
from airlock.v1 import worker_pb2, worker_pb2_grpc
from gateway.pki import DevPki
from gateway.stack import Stack
from gateway.tokens import mint_dev_token


class LiveStack:
    """A running stack plus what tests need to talk to it and to its workers."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.config = stack.config
        if stack.pki is None:
            raise RuntimeError("stack not started")
        self.pki: DevPki = stack.pki

    @property
    def address(self) -> str:
        return self.stack.address

    def token(self, tenant: str = "acme", **kwargs: object) -> str:
        return mint_dev_token(self.pki, self.config.auth, tenant=tenant, subject="tester", **kwargs)  # type: ignore[arg-type]

    def client(self, tenant: str = "acme", **options: object) -> AsyncClient:
        options.setdefault("token", self.token(tenant))
        return AsyncClient(self.address, ca_cert=self.pki.ca_cert, **options)  # type: ignore[arg-type]

    def worker_channel(self, tenant: str, model: str, *, as_worker: bool = False) -> grpc.aio.Channel:
        """A direct mTLS channel to a worker, presenting the gateway's (or a worker's) certificate."""
        cert, key = (
            (self.pki.worker_cert, self.pki.worker_key)
            if as_worker
            else (self.pki.gateway_cert, self.pki.gateway_key)
        )
        credentials = grpc.ssl_channel_credentials(
            self.pki.ca_cert.read_bytes(), key.read_bytes(), cert.read_bytes()
        )
        port = self.stack.workers[(tenant, model)].port
        return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)

    async def worker_info(self, tenant: str, model: str) -> worker_pb2.WorkerInfo:
        async with self.worker_channel(tenant, model) as channel:
            return await worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.WorkerInfoRequest(), timeout=10)
