"""A hostile tenant user spraying the cheapest refusals it can find at a real gateway can't grow the
audit trail faster than its tenant's request quota allows (docs/operations.md, "Audit limits").

Before the fix a 1 MB `model` was copied into the authorization record of every call, and refused
calls (unknown or invalid model, invalid arguments, denied tenant) cost nothing against the quota:
one client wrote 10 MB in 0.13 s, and a full audit disk fails every tenant closed. Now every
verified call pays its home tenant's request rate before it is authorized or audited, a model name
that can't be one is refused before anything records it, and no record is longer than
MAX_RECORD_BYTES. The bound is computed from the calls the quota let through, never from a time.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from airlock.rpcstatus import from_rpc_error
from airlock.v1 import inference_pb2 as pb
from airlock.v1 import inference_pb2_grpc
from control.audit_verify import verify_log
from gateway.audit import MAX_RECORD_BYTES
from tests.conftest import ECHO_TOML, make_policy_dir
from tests.support import LiveStack

RATE, BURST = 5, 10  # acme's quota here: small, so any machine sprays faster than it refills
CALLS = 240
CONCURRENCY = 8
HUGE_MODEL = "m" * 1_000_000  # what the attack sent: a megabyte per call into the audit record
# Audit records one of the refusals sprayed here can cause (docs/operations.md, "Audit limits"): its
# authorization record, the admission's `request` record (or none, for a denial: lockouts are off),
# and the `rate_limited` record counting earlier refusals (written by a call that passed).
RECORDS_PER_REFUSED_CALL = 3


def flood_toml(run: Path) -> str:
    policy = make_policy_dir(run / "policy")
    tenants = policy / "tenants.toml"
    text = tenants.read_text()
    demo = "[tenants.acme.quota]\nrequests_per_second = 200\nburst = 400\n"
    assert demo in text, "the demo quota changed: update this test"
    tenants.write_text(
        text.replace(demo, f"[tenants.acme.quota]\nrequests_per_second = {RATE}\nburst = {BURST}\n")
    )
    toml = ECHO_TOML.replace("max_message_bytes = 65536", "max_message_bytes = 4194304")
    assert toml != ECHO_TOML
    # Lockouts off: a denied call then costs the attacker nothing but its quota (the worst case).
    return (
        f'policy_dir = "{policy}"\n{toml}\n[lockout]\nmax_failures = 0\n'
        f'[audit]\npath = "{run / "audit" / "gateway.jsonl"}"\n'
    )


def generate(model: str, **params: float) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=model, messages=[pb.ChatMessage(role="user", content="hi")], params=pb.SamplingParams(**params)
    )


def attest(model: str) -> pb.AttestationRequest:
    return pb.AttestationRequest(model=model, nonce=os.urandom(16))


Attack = Callable[[inference_pb2_grpc.InferenceStub, tuple[tuple[str, str], ...]], object]

ATTACKS: list[Attack] = [
    lambda stub, md: stub.Generate(generate(HUGE_MODEL), timeout=30, metadata=md),
    lambda stub, md: stub.GenerateStream(generate("z" * 63), timeout=30, metadata=md).read(),  # unknown
    lambda stub, md: stub.Generate(generate("echo", temperature=9.0), timeout=30, metadata=md),
    lambda stub, md: stub.Generate(
        generate("echo"), timeout=30, metadata=(*md, ("x-airlock-tenant", "globex"))
    ),
    lambda stub, md: stub.GetAttestation(attest(HUGE_MODEL), timeout=30, metadata=md),
    lambda stub, md: stub.ListModels(pb.ListModelsRequest(), timeout=30, metadata=md),
]


async def spray(stack: LiveStack, token: str) -> Counter[str]:
    credentials = grpc.ssl_channel_credentials(stack.pki.ca_cert.read_bytes())
    options = [("grpc.max_send_message_length", 8 << 20)]
    outcomes: Counter[str] = Counter()
    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.secure_channel(stack.address, credentials, options=options) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(i: int) -> None:
            async with gate:
                try:
                    await ATTACKS[i % len(ATTACKS)](stub, metadata)  # type: ignore[misc]
                    outcomes["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    outcomes[from_rpc_error(exc).reason] += 1

        await asyncio.gather(*(one(i) for i in range(CALLS)))
    return outcomes


async def test_a_hostile_tenant_user_cannot_grow_the_audit_trail_faster_than_its_quota(
    make_stack: Callable[[str], LiveStack], tmp_path: Path
) -> None:
    stack = make_stack(flood_toml(tmp_path / "flood"))
    audit = stack.config.audit_path
    assert audit.parent == tmp_path / "flood" / "audit"  # this stack's own trail, nobody else's
    before = audit.stat().st_size if audit.exists() else 0
    started = time.monotonic()
    outcomes = await spray(stack, stack.token("acme"))
    elapsed = time.monotonic() - started
    grown = audit.read_bytes()[before:]
    lines = grown.splitlines()

    admitted = CALLS - outcomes["RATE_LIMITED"]  # the calls acme's quota let through
    bound = admitted * RECORDS_PER_REFUSED_CALL * MAX_RECORD_BYTES
    print(f"{outcomes}: audit grew {len(grown)} bytes, {len(lines)} records; bound {bound}")
    assert len(grown) <= bound, f"audit grew {len(grown)} bytes for {admitted} admitted calls: {outcomes}"
    assert len(lines) <= admitted * RECORDS_PER_REFUSED_CALL
    assert all(len(line) < MAX_RECORD_BYTES for line in lines)
    assert HUGE_MODEL[:1000].encode() not in grown  # refused before anything recorded it
    # The quota did the bounding: most calls were refused by it, and no more were let through than
    # a token bucket of BURST refilled at RATE can give in the time the spray took (an upper bound
    # that only grows with time, so a slow machine can't make it fail).
    assert outcomes["RATE_LIMITED"] > 0, outcomes
    assert admitted <= BURST + RATE * elapsed + 1, (admitted, elapsed)
    refused = set(outcomes) - {"OK", "RATE_LIMITED"}
    assert refused <= {"MODEL_INVALID", "UNKNOWN_MODEL", "INVALID_ARGUMENT", "POLICY_DENIED"}, outcomes

    records = [json.loads(line) for line in lines]
    summaries = [r for r in records if r["event"] == "rate_limited"]
    assert sum(r["refused"] for r in summaries) <= outcomes["RATE_LIMITED"]
    assert all(r["tenant"] == "acme" and r["last_subject"] == "acme/tester" for r in summaries)
    assert verify_log(audit, None).ok  # one whole chain (the running gateway signs it later)

    # The flood spent acme's budget only: another tenant's callers are served as before.
    async with stack.client("globex") as globex:
        assert await globex.list_models() == ["echo"]


# The shared echo stack takes messages up to 64 KiB.
@pytest.mark.parametrize(
    "model", ["m" * 60_000, "x" * 64, "Echo", "echo\u2028g, acme/eve, tenant-admin, acme"]
)
async def test_a_model_name_that_cant_be_one_is_refused_before_it_is_audited(
    echo_stack: LiveStack, model: str
) -> None:
    audit = echo_stack.config.audit_path
    before = audit.stat().st_size
    credentials = grpc.ssl_channel_credentials(echo_stack.pki.ca_cert.read_bytes())
    options = [("grpc.max_send_message_length", 8 << 20)]
    async with grpc.aio.secure_channel(echo_stack.address, credentials, options=options) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            md = (("authorization", f"Bearer {echo_stack.token('acme')}"),)
            await stub.Generate(generate(model), timeout=30, metadata=md)
    err = from_rpc_error(info.value)
    assert (info.value.code(), err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MODEL_INVALID")
    assert model not in (info.value.details() or "")
    assert model.encode() not in audit.read_bytes()[before:]
