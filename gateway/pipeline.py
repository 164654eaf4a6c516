"""What every door does with a resolved generation: admit, seal, dispatch, open, relay, record.

One pipeline behind both front doors (the gRPC `Inference` service, gateway/server.py, and the
OpenAI-compatible HTTP door, gateway/http/): a door resolves the call through the guard
(gateway/auth/guard.py), hands the resolved `Generation` and the request in the wire's domain
type (`GenerateRequest`) to this, and only translates what comes back. Within the caller's
deadline: the tenant's quota is reserved (gateway/admission.py), the prompt sealed for the worker
under the tenant's key once the worker attested and was released it (gateway/sealing.py), the
worker called (on its multiplexed channel, gateway/channel.py), its answer opened and relayed, and
the outcome recorded once. A caller that goes away cancels the task running this, which cancels
the request on the channel and aborts the engine.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable, Callable

import grpc

from airlock.envelope import Opener
from airlock.errors import AirlockError, DeadlineExceededError, UnavailableError
from airlock.retry import once_more
from airlock.rpcstatus import from_rpc_error
from airlock.v1 import inference_pb2 as pb
from airlock.v1 import worker_pb2
from gateway.admission import Admission
from gateway.audit import AuditLog
from gateway.call import Call, Generation
from gateway.channel import Exchange
from gateway.policy.authz import Authorizer
from gateway.routing import Router
from gateway.sealing import GatewaySealing, audit_integrity, finish, open_text

__all__ = ["Pipeline", "deadline_in"]


def deadline_in(seconds: float | None) -> float | None:
    """The monotonic time `seconds` from now (None: no deadline)."""
    return None if seconds is None else time.monotonic() + seconds


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


class Pipeline:
    def __init__(
        self,
        router: Router,
        authorizer: Authorizer,
        *,
        admission: Admission,
        sealing: GatewaySealing,
        audit: AuditLog,
    ) -> None:
        self.router = router
        self.authorizer = authorizer
        self.admission = admission
        self.sealing = sealing
        self._audit = audit

    async def generate(
        self, call: Generation, request: pb.GenerateRequest, deadline: float | None
    ) -> pb.GenerateResponse:
        """One whole answer for the resolved call, within `deadline` (monotonic; None: none)."""
        async with self.admission.call(call) as ticket:
            await ticket.admit(call.spec, request.ByteSize())
            work, opener = await self._prepare(call, request)

            async def attempt() -> pb.GenerateResponse:
                exchange = await call.worker.open(work, stream=False, deadline=deadline)
                try:
                    return await exchange.response()
                finally:
                    exchange.close()  # no-op once answered; cancels the worker's generation otherwise

            try:
                response = await once_more(attempt, self._rekeyed(call))
            except grpc.aio.AioRpcError as exc:
                raise self._failed(call, exc) from None
            if opener is not None:
                response.text = open_text(opener, response.sealed_text, call.tenant, self._audit)
                response.ClearField("sealed_text")
                finish(opener, call.tenant, self._audit)
            ticket.usage(response.usage)
            ticket.response_bytes = response.ByteSize()
            return response

    async def stream(
        self, call: Generation, request: pb.GenerateRequest, deadline: float | None
    ) -> AsyncGenerator[pb.GenerateChunk, None]:
        """The answer of the resolved call chunk by chunk; the last one has the finish reason and
        usage. Closing the iterator early (the caller went away) aborts the engine."""
        async with self.admission.call(call) as ticket:
            await ticket.admit(call.spec, request.ByteSize())
            work, opener = await self._prepare(call, request)

            async def start() -> tuple[Exchange, list[pb.GenerateChunk]]:
                exchange = await call.worker.open(work, stream=True, deadline=deadline)
                try:
                    return exchange, await exchange.chunks()
                except BaseException:
                    exchange.close()
                    raise

            exchange: Exchange | None = None
            try:
                opened, batch = await once_more(start, self._rekeyed(call))  # until the first chunk only
                exchange = opened
                while batch:
                    # Sealed to the caller (end to end): each chunk as it is. Else what arrived
                    # while the caller took the previous message goes as one.
                    chunks = batch if opener is None else [self._opened(opener, batch, call.tenant)]
                    for chunk in chunks:
                        ticket.chunk(chunk)
                        yield chunk
                    batch = await opened.chunks()
            except grpc.aio.AioRpcError as exc:
                raise self._failed(call, exc) from None
            finally:
                if exchange is not None:
                    exchange.close()  # no-op when finished; aborts the engine when the caller went away
            if opener is not None:
                finish(opener, call.tenant, self._audit)

    def models(self, call: Call) -> list[pb.ModelInfo]:
        """The tenant's models the caller may generate or stream with, its default marked."""
        subject, tenant = call.principal.policy_subject, call.tenant
        default = self.router.default_model(tenant)
        routes = [
            r for r in self.router.models(tenant)
            if any(self.authorizer.decide(subject, tenant, f"model:{r.model}", act).allowed
                   for act in ("generate", "stream"))
        ]  # fmt: skip
        return [pb.ModelInfo(name=r.model, engine=r.engine, is_default=r.model == default) for r in routes]

    async def _prepare(
        self, call: Generation, request: pb.GenerateRequest
    ) -> tuple[worker_pb2.WorkerRequest, Opener | None]:
        """The worker's request, built from the resolved call: the prompt sealed for the worker
        (once it attested and holds the tenant's keys) with the opener of its answer, or an
        end-to-end prompt as it came (None: relayed untouched both ways)."""
        spec = call.spec
        work = worker_pb2.WorkerRequest(tenant=call.tenant)
        work.request.request_id, work.request.model = spec.request_id, spec.model
        work.request.params.CopyFrom(spec.sampling.to_proto())
        if not self.sealing.is_end_to_end(request):
            await self.sealing.ensure_released(call.tenant, call.model, call.worker.stub)
        return work, self.sealing.seal(call.tenant, spec, request, work.request)

    def _rekeyed(self, call: Generation) -> Callable[[AirlockError], Awaitable[bool]]:
        """Whether a failed worker call goes once more: when the worker lost its keys (restarted, or
        missed a rotation), after attesting it and releasing them again (nothing was generated)."""

        async def recover(err: AirlockError) -> bool:
            if err.reason != "KEYS_MISSING":
                return False
            self.sealing.forget(call.tenant, call.model)
            await self.sealing.ensure_released(call.tenant, call.model, call.worker.stub)
            return True

        return recover

    def _failed(self, call: Generation, exc: grpc.aio.AioRpcError) -> AirlockError:
        err = worker_error(exc)
        if err.reason.startswith("SEAL_"):  # the worker refused a sealed prompt: tampered or misplaced
            audit_integrity(self._audit, call.tenant, err.reason, "request", call.request_id)
        return err

    def _opened(self, opener: Opener, batch: list[pb.GenerateChunk], tenant: str) -> pb.GenerateChunk:
        """One plain chunk for the caller from consecutive sealed ones: their texts joined, their
        tokens added; the last one's finish reason and usage (only the final chunk has them)."""
        chunk = batch[-1]
        texts = [open_text(opener, c.sealed_text, tenant, self._audit) for c in batch]
        chunk.ClearField("sealed_text")
        chunk.text = "".join(texts)
        chunk.tokens = sum(c.tokens for c in batch)
        return chunk


_PASS_THROUGH = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}


def worker_error(exc: grpc.aio.AioRpcError) -> AirlockError:
    """Translate a worker failure for the caller: keep what is theirs to know, hide the rest."""
    code = exc.code()
    if code in _PASS_THROUGH:
        return from_rpc_error(exc)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceededError("deadline exceeded")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return UnavailableError("no healthy worker for this model; retry later", reason="WORKER_UNAVAILABLE")
    return AirlockError("the worker failed to answer", reason="WORKER_FAILED")
