"""Test support: a running stack plus what tests need to talk to it and to its workers."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from airlock import AsyncClient
from airlock.errors import (
    AirlockError,
    AuthenticationError,
    DeadlineExceededError,
    InvalidRequestError,
    PermissionDeniedError,
    QuotaExceededError,
    UnavailableError,
)
from airlock.v1 import worker_pb2, worker_pb2_grpc
from control.launcher import Stack
from control.pki import DevPki
from control.tokens import mint_dev_token

# The gateway's two front doors: gRPC (the SDK) and the OpenAI-compatible HTTPS door (the openai client).
DOORS = ("grpc", "http")
_HTTP_CLASSES: dict[int, type[AirlockError]] = {
    400: InvalidRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: InvalidRequestError,
    413: QuotaExceededError, 429: QuotaExceededError, 503: UnavailableError, 504: DeadlineExceededError,
}  # fmt: skip


def http_error(status: int, body: Any) -> AirlockError:
    """The Airlock error an HTTP door's answer stands for (its OpenAI error object, as received)."""
    error = body["error"] if isinstance(body, dict) and "error" in body else body
    err = _HTTP_CLASSES.get(status, AirlockError)(error["message"], reason=error["code"])
    if isinstance(err, InvalidRequestError):
        err.field = error.get("param") or ""
    err.request_id = error.get("request_id", "")
    return err


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

    @property
    def http_url(self) -> str:
        """The OpenAI-compatible door's base URL (`…/v1` is the OpenAI client's `base_url`)."""
        assert self.stack.http_address is not None, "the HTTP door is disabled"
        return f"https://{self.stack.http_address}"

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.pki.ca_cert))

    def openai(self, tenant: str = "acme", *, token: str | None = None, **headers: str) -> Any:
        """The official `openai.AsyncOpenAI` client on the HTTP door (no retries: tests see each answer)."""
        import openai

        return openai.AsyncOpenAI(
            base_url=f"{self.http_url}/v1", api_key=token if token is not None else self.token(tenant),
            max_retries=0, default_headers=headers or None,
            http_client=openai.DefaultAsyncHttpxClient(verify=self.ssl_context()),
        )  # fmt: skip

    async def generate(
        self,
        door: str,
        token: str | None,
        *,
        tenant: str | None = None,
        model: str = "echo",
        prompt: str = "hi",
    ) -> str:
        """One call through `door`: the answer's text, or the refusal as the SDK's error class."""
        if door == "grpc":
            async with AsyncClient(self.address, ca_cert=self.pki.ca_cert, token=token, tenant=tenant,
                                   timeout=10) as client:  # fmt: skip
                return (await client.generate(prompt, model=model)).text
        import openai

        headers = {"x-airlock-tenant": tenant} if tenant else {}
        async with self.openai(token=token or "", **headers) as client:
            try:
                answer = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompt}], timeout=10
                )
            except openai.APIStatusError as exc:
                raise http_error(exc.status_code, exc.body) from None
        return str(answer.choices[0].message.content)

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

    def audit_records(self, **match: object) -> list[dict[str, Any]]:
        """The gateway's audit records (every stack sharing this state directory) matching `match`."""
        path = self.config.state_dir / "audit" / "gateway.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in records if all(r.get(k) == v for k, v in match.items())]

    def kill_worker(self, tenant: str, model: str) -> list[bytes]:
        """SIGKILL a worker; returns its command line, for `restart_worker`."""
        process = self.stack.workers[(tenant, model)].process
        argv = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")[:-1]
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        return argv

    def restart_worker(self, tenant: str, model: str, argv: list[bytes]) -> None:
        """Start a killed worker again on the address it had (its settings file names it since it
        was first ready; the gateway reconnects by itself)."""
        child = self.stack.workers[(tenant, model)]
        with child.log.open("ab") as log:
            child.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def health(self, service: str = "", *, token: str | None = None) -> str:
        """The gateway's health status for `service`, by name (SERVING, NOT_SERVING, ...).

        A tenant's own status (`tenant/NAME`) answers only that tenant's callers: asked with a token
        of NAME unless `token` says otherwise."""
        if token is None and service.startswith("tenant/"):
            token = self.token(service.removeprefix("tenant/"))
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        credentials = grpc.ssl_channel_credentials(self.pki.ca_cert.read_bytes())
        async with grpc.aio.secure_channel(self.address, credentials) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5, metadata=metadata
            )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
