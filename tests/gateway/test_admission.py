"""Admission around one generation call: the slot is always released, unused tokens are refunded,
and the outcome is counted, audited and (optionally) traced once, without any payload."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from airlock.errors import InvalidRequestError, QuotaExceededError, UnavailableError
from airlock.types import GenerationSpec, Message, Sampling
from airlock.v1 import inference_pb2 as pb
from gateway.admission import Admission
from gateway.audit import AuditLog
from gateway.auth.identity import Principal
from gateway.call import Call, Generation
from gateway.config import AuditConfig, TelemetryConfig
from gateway.metrics import Metrics
from gateway.quota import MemoryQuotaStore, QuotaLimits, Share
from gateway.telemetry import make_tracer

LIMITS = {"acme": QuotaLimits(tokens_per_minute=100, concurrent_streams=1), "globex": QuotaLimits()}


def make(tmp_path: Path, tracer: Any = None) -> tuple[Admission, MemoryQuotaStore, Path]:
    store = MemoryQuotaStore()
    path = tmp_path / "audit.jsonl"
    admission = Admission(store, LIMITS.get, metrics=Metrics(), audit=AuditLog(path), tracer=tracer)
    return admission, store, path


BOB = Principal("bob", "acme", (), "jwt")


def generation(
    method: str = "generate", max_tokens: int = 60, text: str = "hello", principal: Principal = BOB
) -> Generation:
    """A call as the guard resolves it (its worker is never dialled here)."""
    spec = GenerationSpec("req-1", "echo", (Message("user", text),), Sampling(max_tokens=max_tokens))
    tenant = principal.tenant
    return Generation(principal, tenant, method, "model:echo", "req-1", "grpc", model="echo", worker=None,  # type: ignore[arg-type]
                      spec=spec, quota=LIMITS.get(tenant))  # fmt: skip


def sample(admission: Admission, name: str, labels: dict[str, str]) -> float:
    value = admission.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_a_finished_call_refunds_unused_tokens_and_is_recorded_once(tmp_path: Path) -> None:
    admission, store, audit = make(tmp_path)
    call = generation("generate", 60, text="secret canary words")
    async with admission.call(call) as ticket:
        await ticket.admit(call.spec, 100)
        assert store.in_flight("acme") == 1
        assert sample(admission, "airlock_concurrent_streams", {"tenant": "acme"}) == 1
        ticket.usage(pb.Usage(prompt_tokens=7, completion_tokens=5))
    assert store.in_flight("acme") == 0
    assert sample(admission, "airlock_concurrent_streams", {"tenant": "acme"}) == 0
    await store.acquire("acme", LIMITS["acme"], 95, "x")  # 100 - 60 + 55 refunded
    [record] = records(audit)
    assert record == record | {
        "event": "request", "tenant": "acme", "subject": "acme/bob", "request_id": "req-1", "model": "echo",
        "method": "generate", "outcome": "ok", "code": "OK", "prompt_tokens": 7, "completion_tokens": 5,
        "max_tokens": 60,
    }  # fmt: skip
    assert record["latency_ms"] >= 0
    assert "canary" not in audit.read_text()
    labels = {"tenant": "acme", "method": "generate", "code": "OK"}
    assert sample(admission, "airlock_requests_total", labels) == 1
    assert sample(admission, "airlock_tokens_total", {"tenant": "acme", "kind": "prompt"}) == 7
    assert sample(admission, "airlock_tokens_total", {"tenant": "acme", "kind": "completion"}) == 5
    assert (
        sample(admission, "airlock_request_duration_seconds_count", {"tenant": "acme", "method": "generate"})
        == 1
    )


async def test_a_failed_unary_call_keeps_its_reservation_but_frees_its_slot(tmp_path: Path) -> None:
    admission, store, audit = make(tmp_path)
    with pytest.raises(UnavailableError):
        call = generation("generate", 60)
        async with admission.call(call) as ticket:
            await ticket.admit(call.spec, 100)
            raise UnavailableError("no worker", reason="WORKER_UNAVAILABLE")
    assert store.in_flight("acme") == 0
    with pytest.raises(QuotaExceededError):  # the worker may have generated all 60: no refund
        await store.acquire("acme", LIMITS["acme"], 41, "x")
    assert (
        records(audit)[0] | {"code": "UNAVAILABLE", "reason": "WORKER_UNAVAILABLE", "outcome": "error"}
        == (records(audit)[0])
    )


async def test_a_cancelled_stream_frees_its_slot_and_refunds_what_was_not_streamed(tmp_path: Path) -> None:
    admission, store, audit = make(tmp_path)
    entered = asyncio.Event()

    async def stream() -> None:
        call = generation("stream", 60)
        async with admission.call(call) as ticket:
            await ticket.admit(call.spec, 100)
            ticket.chunk(pb.GenerateChunk(text="a b", tokens=2))
            entered.set()
            await asyncio.Event().wait()  # the caller goes away here

    task = asyncio.create_task(stream())
    await entered.wait()
    assert store.in_flight("acme") == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.in_flight("acme") == 0
    await store.acquire("acme", LIMITS["acme"], 98, "x")  # 58 of 60 refunded
    [record] = records(audit)
    assert (record["code"], record["completion_tokens"]) == ("CANCELLED", 2)
    assert (
        sample(
            admission, "airlock_requests_total", {"tenant": "acme", "method": "stream", "code": "CANCELLED"}
        )
        == 1
    )


async def test_over_quota_is_counted_and_holds_nothing(tmp_path: Path) -> None:
    admission, store, audit = make(tmp_path)
    await store.acquire("acme", LIMITS["acme"], 1, "held")  # the one slot is taken
    with pytest.raises(QuotaExceededError) as err:
        call = generation("stream", 10)
        async with admission.call(call) as ticket:
            await ticket.admit(call.spec, 100)
    assert err.value.reason == "CONCURRENCY_LIMITED"
    assert store.in_flight("acme") == 1  # still only the held one
    assert (
        sample(
            admission, "airlock_quota_rejections_total", {"tenant": "acme", "reason": "CONCURRENCY_LIMITED"}
        )
        == 1
    )
    assert sample(admission, "airlock_concurrent_streams", {"tenant": "acme"}) == 0
    assert records(audit)[0]["code"] == "RESOURCE_EXHAUSTED"


async def test_a_call_refused_before_admission_is_recorded_without_its_fields(tmp_path: Path) -> None:
    admission, _store, audit = make(tmp_path)
    with pytest.raises(InvalidRequestError):
        async with admission.call(generation()):
            raise InvalidRequestError("bad", field="request_id")
    [record] = records(audit)
    assert (record["code"], record["request_id"], record["model"]) == ("INVALID_ARGUMENT", "", "")


async def test_a_generation_the_guard_refused_is_recorded_like_one_refused_inside(tmp_path: Path) -> None:
    admission, store, audit = make(tmp_path)
    head = Call(BOB, "acme", "stream", "model:nope", "req-2", "grpc")  # authorized, then not resolvable
    admission.refused(head, InvalidRequestError("unknown model", reason="UNKNOWN_MODEL", field="model"))
    [record] = records(audit)
    assert record == record | {
        "event": "request", "tenant": "acme", "subject": "acme/bob", "method": "stream", "outcome": "error",
        "code": "INVALID_ARGUMENT", "reason": "UNKNOWN_MODEL", "request_id": "", "model": "", "max_tokens": 0,
    }  # fmt: skip
    assert store.in_flight("acme") == 0
    labels = {"tenant": "acme", "method": "stream", "code": "INVALID_ARGUMENT"}
    assert sample(admission, "airlock_requests_total", labels) == 1
    eve = Principal("eve", "initech", (), "jwt")
    admission.refused(Call(eve, "initech", "generate", "model:", "r", "grpc"), RuntimeError("a bug"))
    labels = {"tenant": "other", "method": "generate", "code": "INTERNAL"}  # no series per unknown tenant
    assert sample(admission, "airlock_requests_total", labels) == 1
    assert records(audit)[-1]["reason"] == "INTERNAL"


async def test_a_tenant_missing_from_the_policy_fails_closed_under_the_other_label(tmp_path: Path) -> None:
    admission, _store, _audit = make(tmp_path)
    with pytest.raises(Exception) as err:
        call = generation("generate", 10, principal=Principal("eve", "initech", (), "jwt"))
        async with admission.call(call) as ticket:
            await ticket.admit(call.spec, 100)
    assert getattr(err.value, "reason", "") == "TENANT_UNKNOWN"
    assert sample(admission, "airlock_requests_total",
                  {"tenant": "other", "method": "generate", "code": "PERMISSION_DENIED"}) == 1  # fmt: skip


async def test_spans_carry_ids_and_counts_but_no_payload(tmp_path: Path) -> None:
    pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracer, provider = make_tracer(TelemetryConfig(traces=True), exporter=exporter)
    admission, _store, _audit = make(tmp_path, tracer)
    call = generation("generate", 60, text="secret canary words")
    async with admission.call(call) as ticket:
        await ticket.admit(call.spec, 100)
        ticket.usage(pb.Usage(prompt_tokens=3, completion_tokens=3))
    provider.shutdown()
    [span] = exporter.get_finished_spans()
    assert span.name == "airlock.gateway/generate"
    attributes = dict(span.attributes or {})
    assert attributes["airlock.tenant"] == "acme" and attributes["airlock.request_id"] == "req-1"
    assert attributes["rpc.grpc.status_code"] == 0 and attributes["airlock.completion_tokens"] == 3
    assert "canary" not in repr(attributes)


def test_traces_are_off_by_default() -> None:
    assert make_tracer(TelemetryConfig()) == (None, None)


def test_traces_on_use_the_otlp_exporter_or_refuse_to_start() -> None:
    pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")
    from gateway.telemetry import TelemetryUnavailableError

    try:
        import opentelemetry.exporter.otlp.proto.grpc.trace_exporter  # noqa: F401
    except ImportError:
        with pytest.raises(TelemetryUnavailableError, match="OTLP exporter is not installed"):
            make_tracer(TelemetryConfig(traces=True))
        return
    tracer, provider = make_tracer(TelemetryConfig(traces=True, otlp_endpoint="127.0.0.1:1"))
    assert tracer is not None  # nothing is sent until a span ends: no collector needed here
    provider.shutdown()


# --- the request gate: every verified call pays its home tenant's rate, refused or not ----------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gated(tmp_path: Path, limits: dict[str, QuotaLimits]) -> tuple[Admission, Clock, Path]:
    clock, path = Clock(), tmp_path / "audit.jsonl"
    admission = Admission(
        MemoryQuotaStore(), limits.get, metrics=Metrics(), audit=AuditLog(path), clock=clock
    )
    return admission, clock, path


def test_the_gate_charges_every_call_and_refuses_an_empty_bucket_unaudited(tmp_path: Path) -> None:
    admission, clock, audit = gated(tmp_path, {"acme": QuotaLimits(requests_per_second=2, burst=3)})
    bob = Principal("bob", "acme", (), "jwt")
    for _ in range(3):
        admission.gate(bob)  # the burst
    for _ in range(50):
        with pytest.raises(QuotaExceededError) as err:
            admission.gate(bob)
        assert (err.value.reason, err.value.subject) == ("RATE_LIMITED", "tenant:acme")
        assert err.value.retry_after == pytest.approx(0.5)
    assert not audit.exists() or not records(audit)  # fifty refusals, no record
    assert (
        sample(admission, "airlock_quota_rejections_total", {"tenant": "acme", "reason": "RATE_LIMITED"})
        == 50
    )
    clock.now += 0.5  # one request refilled
    admission.gate(bob)
    [summary] = records(audit)  # the refusals, counted in one record by the next call that passed
    assert (summary["event"], summary["tenant"], summary["refused"], summary["last_subject"]) == (
        "rate_limited",
        "acme",
        50,
        "acme/bob",
    )
    with pytest.raises(QuotaExceededError):
        admission.gate(bob)


def test_the_gate_charges_the_verified_home_tenant_only(tmp_path: Path) -> None:
    limits = {
        "acme": QuotaLimits(requests_per_second=1, burst=1),
        "globex": QuotaLimits(requests_per_second=1),
    }
    admission, _clock, _audit = gated(tmp_path, limits)
    admission.gate(Principal("eve", "acme", (), "jwt"))  # however many calls name globex later
    with pytest.raises(QuotaExceededError):
        admission.gate(Principal("eve", "acme", (), "jwt"))
    admission.gate(Principal("carol", "globex", (), "jwt"))  # globex's budget is untouched


def test_the_gate_passes_tenants_without_a_request_rate(tmp_path: Path) -> None:
    admission, _clock, audit = gated(tmp_path, {"globex": QuotaLimits(tokens_per_minute=10)})
    for _ in range(100):
        admission.gate(Principal("carol", "globex", (), "jwt"))
        admission.gate(Principal("x", "initech", (), "jwt"))  # not in the policy: refused elsewhere
    assert not audit.exists() or not records(audit)


async def test_the_memory_store_is_released_in_place_without_a_task(tmp_path: Path) -> None:
    admission, store, _audit = make(tmp_path)
    made: list[object] = []
    real = asyncio.ensure_future
    asyncio.ensure_future = lambda *a, **kw: (made.append(a), real(*a, **kw))[1]  # type: ignore[assignment]
    try:
        call = generation("generate", 60)
        async with admission.call(call) as ticket:
            await ticket.admit(call.spec, 100)
            ticket.usage(pb.Usage(prompt_tokens=1, completion_tokens=1))
    finally:
        asyncio.ensure_future = real
    assert store.in_flight("acme") == 0 and made == [] and not admission._releases


async def test_a_call_cancelled_while_its_outcome_is_being_written_still_frees_its_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, path = MemoryQuotaStore(), tmp_path / "audit.jsonl"
    audit = AuditLog(path, config=AuditConfig(fsync="always", sign_every_seconds=0))
    admission = Admission(store, LIMITS.get, metrics=Metrics(), audit=audit)
    syncing, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        syncing.set()
        release.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)

    async def unary() -> None:
        call = generation("generate", 60)
        async with admission.call(call) as ticket:
            await ticket.admit(call.spec, 100)

    task = asyncio.create_task(unary())
    await asyncio.to_thread(syncing.wait, 10)  # the outcome is being fsynced; the call waits for it
    assert store.in_flight("acme") == 0  # released already: nothing left for a cancellation to lose
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    audit.close()
    assert store.in_flight("acme") == 0
    [record] = records(path)
    assert record["event"] == "request"  # written all the same


async def test_a_tenants_series_are_looked_up_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    admission, _store, _audit = make(tmp_path)
    looked_up: list[tuple[str, ...]] = []
    for metric in (admission.metrics.requests, admission.metrics.request_seconds, admission.metrics.tokens,
                   admission.metrics.concurrent_streams):  # fmt: skip
        real = metric.labels
        monkeypatch.setattr(metric, "labels", lambda *a, real=real: (looked_up.append(a), real(*a))[1])
    for _ in range(5):
        call = generation("generate", 10)
        async with admission.call(call) as ticket:
            await ticket.admit(call.spec, 100)
            ticket.usage(pb.Usage(prompt_tokens=1, completion_tokens=1))
    # concurrent streams, requests (generate, OK), duration (generate), tokens prompt and completion
    assert len(looked_up) == 5
    labels = {"tenant": "acme", "method": "generate", "code": "OK"}
    assert sample(admission, "airlock_requests_total", labels) == 5


def test_several_processes_split_the_gate_and_never_pass_more_than_the_policy(tmp_path: Path) -> None:
    limits = {"acme": QuotaLimits(requests_per_second=10, burst=5)}
    passed = []
    for index in range(2):
        clock = Clock()
        admission = Admission(MemoryQuotaStore(), limits.get, metrics=Metrics(),
                              audit=AuditLog(tmp_path / f"audit-{index}.jsonl"), clock=clock,
                              share=Share(index, 2))  # fmt: skip
        count = 0
        for _ in range(20):
            try:
                admission.gate(BOB)
                count += 1
            except QuotaExceededError:
                pass
        clock.now += 1.0  # one second refills this process's half of the rate (5), up to its part
        for _ in range(20):
            try:
                admission.gate(BOB)
                count += 1
            except QuotaExceededError:
                pass
        passed.append(count)
    assert passed == [3 + 3, 2 + 2]  # bursts 3 + 2 = 5; refills capped by each part
