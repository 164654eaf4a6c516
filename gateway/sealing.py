"""Gateway-sealed mode: the prompt goes to a worker only sealed under the tenant's key, and only to a
worker that proved what it runs and was released the tenant's keys.

Before a worker gets its first request (and again after it restarts, after a key rotation, after its
tenant's attestation policy changes, or every `reattest_seconds`), the gateway asks it for evidence
bound to a fresh nonce, verifies it against the tenant's policy, and releases the tenant's usable keys
sealed with HPKE to the worker's attested key. Evidence that falls short releases nothing: the call
fails with FAILED_PRECONDITION, audited. End-to-end requests (sealed by the client to the worker's
key) pass through untouched: the gateway holds nothing that opens them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from airlock.attestation import AttestationPolicy, Verified, hpke_seal, key_release_info, verify
from airlock.envelope import Opener, SealError
from airlock.errors import AirlockError, AttestationError, UnavailableError
from airlock.sealing import E2E_KEY_ID, request_key, response_key, seal_prompt
from airlock.types import GenerationSpec
from airlock.v1 import inference_pb2 as pb
from airlock.v1 import worker_pb2, worker_pb2_grpc
from gateway.audit import AuditLog
from gateway.keys.store import Keystore, KeystoreError
from serving.logs import current_request_id

__all__ = ["GatewaySealing"]

_log = logging.getLogger("airlock.sealing")
NONCE_BYTES = 32


@dataclass(frozen=True)
class _Released:
    worker_id: str
    generation: int
    policy: AttestationPolicy
    at: float


class GatewaySealing:
    def __init__(
        self,
        keystore: Keystore,
        *,
        ca_pem: bytes,
        policy_for: Callable[[str], AttestationPolicy],
        audit: AuditLog,
        reattest_seconds: float = 600.0,
        may_share: Callable[[str], bool] = lambda _tenant: False,
    ) -> None:
        self.keystore = keystore
        self.ca_pem = ca_pem
        self.policy_for = policy_for
        self.audit = audit
        self.reattest_seconds = reattest_seconds
        self.may_share = may_share  # whether the policy in service opts a tenant in to shared workers
        self._released: dict[tuple[str, str], _Released] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._active: dict[str, tuple[int, str, bytes]] = {}

    # -- keys -------------------------------------------------------------------------------------
    def active_key(self, tenant: str) -> tuple[str, bytes]:
        generation = self.keystore.generation
        cached = self._active.get(tenant)
        if cached is None or cached[0] != generation:
            try:
                key_id, key = self.keystore.active(tenant)
            except KeystoreError:
                raise UnavailableError(
                    "this tenant has no active key; an operator must create one (airlock keys create)",
                    reason="TENANT_KEY_MISSING",
                ) from None
            cached = self._active[tenant] = (generation, key_id, key)
        return cached[1], cached[2]

    async def watch(
        self, stop: asyncio.Event, interval: float = 1.0, on_error: Callable[[], None] = lambda: None
    ) -> None:
        """Notice keystore changes made outside this process (`airlock keys rotate`) until `stop`.

        Nothing ends it early: a failure (a keystore mid-write, unreadable or gone, or anything the
        reload raises) keeps the keys we have, is counted (`on_error`) and logged once until it
        changes or ends, and the next round tries again."""
        failing = ""  # the failure reported last: a missing store must not log every second
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            try:
                if await asyncio.to_thread(self.keystore.reload):
                    _log.info("keystore changed; workers get the new keys before their next request")
                if failing:
                    _log.info("keystore readable again")
                failing = ""
            except Exception as exc:
                on_error()
                what = f"{type(exc).__name__}: {exc}"
                if what != failing:
                    _log.error("keystore reload failed; keeping the previous keys", exc_info=exc)
                failing = what

    # -- attestation and key release --------------------------------------------------------------
    def forget(self, tenant: str, model: str) -> None:
        self._released.pop((tenant, model), None)

    def _current(self, route: tuple[str, str], policy: AttestationPolicy) -> bool:
        done = self._released.get(route)
        return (
            done is not None
            and done.generation == self.keystore.generation
            and (done.policy is policy or done.policy == policy)
            and time.monotonic() - done.at < self.reattest_seconds
        )

    async def ensure_released(self, tenant: str, model: str, stub: worker_pb2_grpc.WorkerStub) -> None:
        route = (tenant, model)
        policy = self.policy_for(tenant)
        if self._current(route, policy):
            return
        async with self._locks.setdefault(route, asyncio.Lock()):  # one attestation per worker at a time
            if not self._current(route, policy):
                await self._release(tenant, model, stub, policy)

    async def _release(
        self, tenant: str, model: str, stub: worker_pb2_grpc.WorkerStub, policy: AttestationPolicy
    ) -> None:
        nonce = os.urandom(NONCE_BYTES)
        try:
            request = worker_pb2.EvidenceRequest(nonce=nonce, tenant=tenant)
            evidence = await stub.GetEvidence(request, timeout=10)
        except grpc.aio.AioRpcError:
            raise UnavailableError(
                "the worker did not answer for attestation", reason="WORKER_UNAVAILABLE"
            ) from None
        try:
            verified = verify(evidence, ca_pem=self.ca_pem, nonce=nonce, tenant=tenant, policy=policy)
            self._check_isolation(verified, tenant)
        except AttestationError as exc:
            self.audit.record("attestation", decision="refused", tenant=tenant, model=model,
                              reason=exc.reason, request_id=current_request_id())  # fmt: skip
            raise
        keys, active_id, generation = await asyncio.to_thread(self._snapshot, tenant)
        plain = worker_pb2.TenantKeys(keys=keys, active_key_id=active_id).SerializeToString()
        sealed = hpke_seal(verified.hpke_suite, verified.hpke_public_key, plain,
                           key_release_info(tenant, verified.worker_id, nonce))  # fmt: skip
        release = worker_pb2.KeyRelease(
            tenant=tenant, worker_id=verified.worker_id, sealed_keys=sealed, nonce=nonce
        )
        try:
            await stub.ReleaseKeys(release, timeout=10)
        except grpc.aio.AioRpcError:
            raise UnavailableError(
                "the worker did not accept its keys", reason="WORKER_UNAVAILABLE"
            ) from None
        self._released[(tenant, model)] = _Released(verified.worker_id, generation, policy, time.monotonic())
        self.audit.record(
            "key_release", decision="released", tenant=tenant, model=model, level=verified.level,
            worker_id=verified.worker_id, key_ids=sorted(keys), suite=verified.hpke_suite,
            measurements=dict(verified.measurements), request_id=current_request_id(),
        )  # fmt: skip

    def _check_isolation(self, verified: Verified, tenant: str) -> None:
        """A worker that says (in its signed, verified statement) it serves several tenants gets a
        tenant's keys only while the policy opts that tenant in, whatever the routes say."""
        if verified.isolation != "dedicated" and not self.may_share(tenant):
            raise AttestationError("the worker is shared and this tenant is not opted in to shared isolation",
                                   reason="ISOLATION_NOT_ALLOWED")  # fmt: skip

    def _snapshot(self, tenant: str) -> tuple[dict[str, bytes], str, int]:
        """The usable keys, the active key id and the generation they belong to, read consistently:
        a rotation between the reads (the watcher reloads in another thread) means reading again."""
        for _ in range(5):
            generation = self.keystore.generation
            keys = self.keystore.usable(tenant)
            active_id, _ = self.keystore.active(tenant)
            if generation == self.keystore.generation and active_id in keys:
                return keys, active_id, generation
        raise UnavailableError("the keystore kept changing; retry", reason="KEYSTORE_BUSY")

    # -- payloads ---------------------------------------------------------------------------------
    @staticmethod
    def is_end_to_end(request: pb.GenerateRequest) -> bool:
        return bool(request.HasField("end_to_end") or request.HasField("sealed_messages"))

    def seal(
        self, tenant: str, spec: GenerationSpec, request: pb.GenerateRequest, out: pb.GenerateRequest
    ) -> Opener | None:
        """Put the prompt of the caller's `request` (only read) into `out`, the worker's request
        for `spec`: its messages sealed under the tenant's active key, returning the opener of the
        answer; or, end to end, its sealed fields as they came, checked for shape, returning None
        (the gateway can open neither way)."""
        if self.is_end_to_end(request):
            key_id = Opener.header_of(request.sealed_messages).key_id
            if (
                not (request.HasField("end_to_end") and request.HasField("sealed_messages"))
                or key_id != E2E_KEY_ID
            ):
                audit_integrity(self.audit, tenant, "SEAL_MALFORMED", "request", spec.request_id)
                raise SealError("an end-to-end request needs both sealed_messages and end_to_end",
                                reason="SEAL_MALFORMED")  # fmt: skip
            out.sealed_messages.CopyFrom(request.sealed_messages)
            out.end_to_end.CopyFrom(request.end_to_end)
            return None
        key_id, key = self.active_key(tenant)
        sealed = seal_prompt(request.messages, request_key(tenant, key_id, spec.request_id, spec.model), key)
        out.sealed_messages.CopyFrom(sealed)
        return Opener(key, response_key(tenant, key_id, spec.request_id, spec.model))


def audit_integrity(audit: AuditLog, tenant: str, reason: str, direction: str, request_id: str) -> None:
    """The one audit record of a sealed payload refused: which way it travelled and why."""
    audit.record("integrity", decision="refused", tenant=tenant, reason=reason, direction=direction,
                 request_id=request_id)  # fmt: skip


def open_text(opener: Opener, sealed: pb.Sealed, tenant: str, audit: AuditLog) -> str:
    """Open one sealed answer payload from a worker; a failure is the worker's (or the wire's), not
    the caller's, so it is audited and surfaces as an internal error with the reason."""
    try:
        return opener.open(sealed).decode()
    except (SealError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "reason", "SEAL_MALFORMED")
        audit_integrity(audit, tenant, reason, "response", current_request_id())
        raise AirlockError("the worker's answer failed its integrity check", reason=reason) from None


def finish(opener: Opener, tenant: str, audit: AuditLog) -> None:
    try:
        opener.finish()
    except SealError as exc:
        audit_integrity(audit, tenant, exc.reason, "response", current_request_id())
        raise AirlockError("the worker's answer was cut short", reason=exc.reason) from None
