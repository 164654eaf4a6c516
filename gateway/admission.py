"""Admission and accounting of one generation call: quota reservation, metrics, audit, trace span.

The servicer wraps each Generate/GenerateStream call in `Admission.call(call)` (the call as the
guard resolved it, gateway/call.py); inside it, `admit()` reserves the tenant's quota for the
validated request, and the end of the block (success, error, cancellation or a caller that went
away) always releases the concurrency slot, refunds the tokens not generated, and records the
outcome once: counters, latency, tokens and one audit line. A generation the guard refused after
authorizing it (a bad request, an unknown model) is recorded the same way (`refused`). Nothing here
ever sees or records a prompt or a completion.

What the end costs, per call: the outcome record is submitted to the audit trail's group commit and
awaited (written, and fsynced as `audit.fsync` says, before the caller hears the answer); a store
that releases without waiting (the memory store) is released in place, so no task and no shield
are needed for a release that cancellation can't interrupt anyway; the tenant's metric series are
bound once (`Metrics.tenant`).

Earlier still, `Admission.gate` charges every authenticated call (any method, refused or not) one
request of its home tenant's request rate in this replica, before the guard authorizes or audits
it: refusals can't be sprayed for free, and what a tenant's callers can make this replica write to
its audit trail is bounded by the tenant's `requests_per_second` and `burst` (docs/quotas.md). A
gateway of N processes (`gateway.processes`) splits that bound between them (`Share`): together
they write no more.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import grpc

from airlock.errors import PermissionDeniedError, QuotaExceededError
from airlock.types import GenerationSpec
from airlock.v1 import inference_pb2 as pb
from gateway.audit import AuditLog
from gateway.auth.identity import Principal
from gateway.call import Call, Generation
from gateway.metrics import Metrics
from gateway.quota import RATE_LIMITED, WHOLE, Bucket, QuotaLimits, QuotaStore, Share, quota_error
from serving.rpc import caller_error

__all__ = ["Admission", "Ticket"]

_log = logging.getLogger("airlock.admission")

# tenant -> its quota in the policy in service (None: the policy doesn't know the tenant)
LimitsFor = Callable[[str], QuotaLimits | None]


class Admission:
    def __init__(
        self,
        store: QuotaStore,
        limits_for: LimitsFor,
        *,
        metrics: Metrics,
        audit: AuditLog,
        tracer: Any = None,  # an OpenTelemetry Tracer when tracing is on (gateway.telemetry)
        clock: Callable[[], float] = time.monotonic,
        share: Share = WHOLE,  # this process's part of each request rate (gateway.processes)
    ) -> None:
        self.store = store
        self.share = share
        self.limits_for = limits_for
        self.metrics = metrics
        self.audit = audit
        self.tracer = tracer
        self._clock = clock
        self._releases: set[asyncio.Task[None]] = set()
        self._gates: dict[str, Bucket] = {}  # home tenant -> its request bucket in this replica
        self._gated: dict[str, tuple[int, str]] = {}  # tenant -> (calls refused, last subject), unaudited

    def call(self, call: Generation) -> Ticket:
        """The accounting of one generation, an async context manager around the servicer's work."""
        return Ticket(self, call, call.quota)

    def refused(self, call: Call, exc: BaseException) -> None:
        """Count and audit a generation the guard refused after authorizing it (it could not be
        validated or routed) exactly as one refused inside `call()`: nothing was reserved."""
        Ticket(self, call, self.limits_for(call.tenant)).end(exc)

    def gate(self, principal: Principal) -> None:
        """Charge a verified caller's call one request of its home tenant's request rate, or refuse
        it (RESOURCE_EXHAUSTED, RATE_LIMITED) when the tenant's bucket in this replica is empty.

        Called by the guard right after authentication, before anything else is decided or audited:
        the home tenant is the identity's own, so a call naming another tenant can't spend that
        tenant's budget, and nothing is charged before a signature verified. Synchronous (the guard
        is), and per replica: each replica keeps its own audit trail, which is what this bounds;
        with the Redis backend, admitted generation calls also draw on the shared budget. Refusals
        here are not audited one by one (that is the flood this prevents): they are counted, and
        the next call of the tenant that passes writes one `rate_limited` record with their number."""
        tenant = principal.tenant
        limits = self.limits_for(tenant)
        if limits is None or not limits.requests_per_second:
            return  # not limited (an unknown tenant is refused by the policy, or at admission)
        share, now = self.share, self._clock()
        size, rate = float(share.part(int(limits.bucket))), share.rate(limits.requests_per_second)
        bucket = self._gates.setdefault(tenant, Bucket(size, now))
        level = bucket.refill(now, rate, size)
        if level < 1:
            refused, _ = self._gated.get(tenant, (0, ""))
            self._gated[tenant] = (refused + 1, principal.policy_subject)
            self.metrics.tenant(tenant).quota_rejections[RATE_LIMITED].inc()
            raise quota_error(RATE_LIMITED, (1 - level) / rate, tenant)
        bucket.level -= 1
        if (gated := self._gated.get(tenant)) is not None:
            self.audit.record("rate_limited", tenant=tenant, refused=gated[0], last_subject=gated[1])
            del self._gated[tenant]

    def _release(
        self, tenant: str, limits: QuotaLimits, lease: str, refund: int
    ) -> asyncio.Task[None] | None:
        """Release `lease`: in place when the store can without waiting (None: done), else in a task
        of its own, so that a second cancellation of the call can't interrupt the release."""
        try:
            if self.store.release_now(tenant, limits, lease, refund):
                return None
        except Exception:
            _log.exception("quota release failed", extra={"tenant": tenant})
            return None
        task = asyncio.ensure_future(self._release_logged(tenant, limits, lease, refund))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)
        return task

    async def _release_logged(self, tenant: str, limits: QuotaLimits, lease: str, refund: int) -> None:
        try:
            await self.store.release(tenant, limits, lease, refund)
        except Exception:
            _log.exception("quota release failed", extra={"tenant": tenant})


class Ticket:
    """One generation's accounting, from the moment the guard handed it over to its end."""

    def __init__(self, admission: Admission, call: Call, quota: QuotaLimits | None) -> None:
        self.admission = admission
        self.method = call.action
        self.door = call.door
        self.tenant = call.tenant
        self.subject = call.principal.policy_subject
        self.quota = quota  # the tenant's, as the call was resolved; None: not in the policy
        self.label = call.tenant if quota is not None else "other"  # only the policy's tenants: no new series
        self.series = admission.metrics.tenant(self.label)
        self.request_id = ""
        self.model = ""
        self.max_tokens = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finished = False  # usage was reported: the completion token count is exact
        self._reserved: QuotaLimits | None = None  # what admit() reserved against
        self._lease = ""
        self.request_bytes = 0  # the caller's request, as received
        self.response_bytes = 0  # what went back to the caller
        self._start = time.perf_counter()
        tracer = admission.tracer
        self._span: Any = tracer.start_span(f"airlock.gateway/{self.method}") if tracer is not None else None

    async def __aenter__(self) -> Ticket:
        return self

    async def admit(self, spec: GenerationSpec, request_bytes: int) -> None:
        """Reserve quota for the validated request (its id, model and max_tokens are final)."""
        self.request_id = spec.request_id
        self.model = spec.model
        self.max_tokens = spec.sampling.max_tokens
        self.request_bytes = request_bytes
        if self.quota is None:  # fail closed: a tenant without settings has no quota to spend
            raise PermissionDeniedError("tenant is not in the policy", reason="TENANT_UNKNOWN")
        lease = os.urandom(16).hex()  # unique among every replica's leases (they may share Redis)
        try:
            await self.admission.store.acquire(self.tenant, self.quota, self.max_tokens, lease)
        except QuotaExceededError as exc:
            self.series.quota_rejections[exc.reason].inc()
            raise
        self._reserved, self._lease = self.quota, lease
        self.series.streams.inc()

    def usage(self, usage: pb.Usage) -> None:
        self.prompt_tokens = usage.prompt_tokens
        self.completion_tokens = usage.completion_tokens
        self.finished = True

    def chunk(self, chunk: pb.GenerateChunk) -> None:
        """Count a streamed chunk; the final one carries the exact usage."""
        self.response_bytes += chunk.ByteSize()
        if chunk.HasField("usage"):
            self.usage(chunk.usage)
        elif not self.finished:
            self.completion_tokens += chunk.tokens

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        release, written = self._end(exc, self.admission.audit.submit)
        try:
            if written is not None:
                await written  # the outcome record, written (and fsynced per policy) with its group
        finally:
            if release is not None:
                # Shielded: cancelled again while waiting, the release still finishes in its own task.
                await asyncio.shield(release)

    def end(self, exc: BaseException | None) -> asyncio.Task[None] | None:
        """Record the outcome (`exc` None: OK), written when this returns, and start releasing what
        was reserved, if anything."""
        release, _ = self._end(exc, self.admission.audit.record)
        return release

    def _end(
        self, exc: BaseException | None, write: Callable[..., Any]
    ) -> tuple[asyncio.Task[None] | None, Any]:
        release = None
        if self._reserved is not None:
            # Tokens not generated go back. Without a final usage (error, cancel) only what was seen
            # streaming is known; a failed unary call keeps its whole reservation (fail closed).
            seen = self.completion_tokens if (self.finished or self.method == "stream") else self.max_tokens
            refund = max(0, self.max_tokens - seen)
            release = self.admission._release(self.tenant, self._reserved, self._lease, refund)
            self.series.streams.dec()
        err = None if exc is None else caller_error(exc)  # what the caller is told, as the interceptor does
        code, reason = (grpc.StatusCode.OK, "") if err is None else (err.code, err.reason)
        # Should the record fail (the audit trail is down), a release task goes on by itself.
        return release, self._record(code, reason, write)

    def _record(self, code: grpc.StatusCode, reason: str, write: Callable[..., Any]) -> Any:
        seconds = time.perf_counter() - self._start
        series = self.series
        series.requests[self.method, code.name].inc()
        series.seconds[self.method].observe(seconds)
        series.tokens["prompt"].inc(self.prompt_tokens)
        series.tokens["completion"].inc(self.completion_tokens)
        if self._span is not None:
            self._span.set_attributes({
                "airlock.tenant": self.tenant, "airlock.method": self.method,
                "airlock.request_id": self.request_id, "airlock.model": self.model,
                "rpc.grpc.status_code": code.value[0], "airlock.reason": reason,
                "airlock.prompt_tokens": self.prompt_tokens,
                "airlock.completion_tokens": self.completion_tokens,
            })  # fmt: skip
            self._span.end()
        return write(
            "request",
            tenant=self.tenant,
            subject=self.subject,
            request_id=self.request_id,
            model=self.model,
            method=self.method,
            door=self.door,
            outcome="ok" if code == grpc.StatusCode.OK else "error",
            code=code.name,
            reason=reason,
            max_tokens=self.max_tokens,
            request_bytes=self.request_bytes,
            response_bytes=self.response_bytes,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            latency_ms=round(seconds * 1000, 3),
        )
