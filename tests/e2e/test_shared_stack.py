"""The `shared` isolation level on live stacks: two opted-in tenants on ONE worker process, a third
(dedicated) tenant never routed there, keys and evidence per tenant, the security team's opt-in
enforced at run time (policy hot reload), and a crash of the shared worker. Real gateway and worker
processes over TLS; EchoEngine except for the last test (the bundled model)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from airlock import AsyncClient, AttestationError, UnavailableError
from airlock.attestation import AttestationPolicy
from airlock.envelope import Opener, SealError, StreamKey
from airlock.sealing import request_key, response_key, seal_prompt
from airlock.v1 import inference_pb2 as pb
from airlock.v1 import inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from gateway.keys import open_keystore
from serving.settings import WorkerSettings
from tests.conftest import _start, make_policy_dir
from tests.support import LiveStack

SHARED = ("shared", "echo")
E2E = AttestationPolicy(min_level="software")

TENANTS_TOML = """
[tenants.acme]
issuers = ["airlock-dev"]
isolation = "{acme}"

[tenants.globex]
issuers = ["airlock-dev"]
isolation = "{globex}"

[tenants.initech]
issuers = ["airlock-dev"]
"""

STACK_TOML = """
[gateway]
max_tokens = 512
grace_seconds = 5

[models.echo]
engine = "echo"

[models.slow]
engine = "echo"
tokens_per_second = 20

[tenants.acme]
models = ["echo", "slow"]
isolation = "shared"

[tenants.globex]
models = ["echo", "slow"]
isolation = "shared"

[tenants.initech]
models = ["echo"]

[supervisor]
backoff_seconds = 0.2
health_interval_seconds = 1
arena_mb = 4
"""


def shared_policy(directory: Path, *, acme: str = "shared", globex: str = "shared") -> Path:
    """The repository's policy plus a dedicated third tenant, with acme's and globex's opt-ins."""
    policy = make_policy_dir(directory, "g, acme/tester, user, acme\ng, globex/tester, user, globex\n"
                                        "g, initech/tester, user, initech\n")  # fmt: skip
    (policy / "tenants.toml").write_text(TENANTS_TOML.format(acme=acme, globex=globex))
    return policy


def stack_toml(policy: Path, body: str = STACK_TOML) -> str:
    return f'policy_dir = "{policy}"\n' + textwrap.dedent(body)


@pytest.fixture(scope="module")
def shared_stack(state_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    run = tmp_path_factory.mktemp("shared-run")
    stack = _start(state_dir, run, stack_toml(shared_policy(run / "policy")))
    yield LiveStack(stack)
    stack.stop()


def shared_channel(live: LiveStack) -> grpc.aio.Channel:
    return live.worker_channel(*SHARED)


async def evidence(live: LiveStack, tenant: str, model: str = "echo") -> dict[str, Any]:
    """The statement of the evidence the gateway relays for `tenant` (GetAttestation)."""
    credentials = grpc.ssl_channel_credentials(live.pki.ca_cert.read_bytes())
    async with grpc.aio.secure_channel(live.address, credentials) as channel:
        reply = await inference_pb2_grpc.InferenceStub(channel).GetAttestation(
            pb.AttestationRequest(model=model, nonce=os.urandom(32)),
            metadata=[("authorization", f"Bearer {live.token(tenant)}")], timeout=10,
        )  # fmt: skip
    statement: dict[str, Any] = json.loads(reply.evidence.statement)
    return statement


async def test_two_opted_in_tenants_are_served_by_one_worker_process(shared_stack: LiveStack) -> None:
    live = shared_stack
    # One worker for both shared tenants (per model), one for the dedicated tenant; none for acme or
    # globex alone.
    assert set(live.stack.workers) == {("shared", "echo"), ("shared", "slow"), ("initech", "echo")}
    shared = live.stack.workers[SHARED]
    info = await live.worker_info(*SHARED)
    assert info.pid == shared.process.pid and info.isolation == "shared"
    assert sorted(info.tenants) == ["acme", "globex"]
    dedicated = await live.worker_info("initech", "echo")
    assert list(dedicated.tenants) == ["initech"] and dedicated.isolation == "dedicated"
    assert dedicated.pid != info.pid

    before_shared, before_initech = info.requests_started, dedicated.requests_started
    for tenant in ("acme", "globex", "initech"):
        async with live.client(tenant) as client:
            assert (
                await client.generate(f"hello from {tenant}", model="echo")
            ).text == f"hello from {tenant}"
    # acme and globex reached the one shared process; initech only its own worker.
    assert (await live.worker_info(*SHARED)).requests_started == before_shared + 2
    assert (await live.worker_info("initech", "echo")).requests_started == before_initech + 1
    # Each tenant's keys went to its own attested identity on the shared worker (its own HPKE key).
    releases = {
        t: live.audit_records(event="key_release", tenant=t, model="echo")[-1] for t in ("acme", "globex")
    }
    assert releases["acme"]["worker_id"] != releases["globex"]["worker_id"]
    assert all(k.startswith("acme-") for k in releases["acme"]["key_ids"])


async def test_each_shared_tenant_answer_opens_only_with_its_own_key(shared_stack: LiveStack) -> None:
    live = shared_stack
    for tenant in ("acme", "globex"):  # the gateway attests and releases both tenants' keys
        async with live.client(tenant) as client:
            await client.generate("warm up", model="echo")
    keystore = open_keystore(live.config.keys, live.config.state_dir)
    keys = {t: keystore.active(t) for t in ("acme", "globex")}

    def sealed(tenant: str, text: str) -> pb.GenerateRequest:
        request_id, (key_id, key) = f"direct-{tenant}-{time.monotonic_ns()}", keys[tenant]
        prompt = seal_prompt([pb.ChatMessage(role="user", content=text)],
                             request_key(tenant, key_id, request_id, "echo"), key)  # fmt: skip
        return pb.GenerateRequest(request_id=request_id, model="echo", sealed_messages=prompt)

    def answer(tenant: str, key_id: str, request: pb.GenerateRequest) -> StreamKey:
        return response_key(tenant, key_id, request.request_id, request.model)

    async with shared_channel(live) as channel:  # as the gateway (its certificate)
        stub = worker_pb2_grpc.WorkerStub(channel)
        for tenant, other in (("acme", "globex"), ("globex", "acme")):
            request = sealed(tenant, f"for {tenant} only")
            reply = await stub.Generate(worker_pb2.WorkerRequest(tenant=tenant, request=request), timeout=10)
            key_id, key = keys[tenant]
            assert Opener(key, answer(tenant, key_id, request)).open(reply.sealed_text) == (
                f"for {tenant} only".encode()
            )
            other_id, other_key = keys[other]
            for wrong in (
                Opener(other_key, answer(other, other_id, request)),  # the other tenant's key
                Opener(key, answer(other, key_id, request)),  # right key, other tenant's label
            ):
                with pytest.raises(SealError):
                    wrong.open(reply.sealed_text)
            # Sealed for this tenant but labelled for the other: the worker refuses it.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                mislabelled = worker_pb2.WorkerRequest(tenant=other, request=sealed(tenant, "moved"))
                await stub.Generate(mislabelled, timeout=10)
            assert err.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)
            # And a tenant it does not serve at all is refused outright.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(worker_pb2.WorkerRequest(tenant="initech", request=sealed(tenant, "x")),
                                    timeout=10)  # fmt: skip
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_end_to_end_mode_against_the_shared_worker_names_each_tenant(shared_stack: LiveStack) -> None:
    live = shared_stack
    worker_ids = {}
    for tenant in ("acme", "globex"):
        client = AsyncClient(live.address, token=live.token(tenant), ca_cert=live.pki.ca_cert,
                             worker_ca=live.pki.attest_ca_cert, end_to_end=E2E)  # fmt: skip
        async with client:
            verified = await client.attestation("echo")
            assert verified.tenant == tenant and verified.model == "echo"
            assert (await client.generate(f"only {tenant}'s worker key", model="echo")).text == (
                f"only {tenant}'s worker key"
            )
            streamed = "".join([c.text async for c in client.stream("chunk by chunk", model="echo")])
            assert streamed == "chunk by chunk"
        worker_ids[tenant] = verified.worker_id
        statement = await evidence(live, tenant)
        assert statement["tenant"] == tenant and statement["isolation"] == "shared"
        assert statement["tenants"] == ["acme", "globex"]
    assert worker_ids["acme"] != worker_ids["globex"]
    # The dedicated tenant's evidence says so too, and its configuration measurement differs.
    initech = await evidence(live, "initech")
    assert initech["isolation"] == "dedicated" and initech["tenants"] == ["initech"]
    assert initech["measurements"]["config"] != (await evidence(live, "acme"))["measurements"]["config"]


async def test_an_attestation_policy_can_refuse_shared_workers_by_measurement(make_stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The security team pins acme's configuration measurement to a dedicated worker's: the shared
    worker's (which measures isolation=shared and its tenant set) gets no key for acme."""
    policy = shared_policy(tmp_path / "policy")
    with (policy / "tenants.toml").open("a") as fh:
        fh.write(f'\n[tenants.acme.attestation]\nmeasurements.config = ["{"cd" * 32}"]\n')
    live: LiveStack = make_stack(stack_toml(policy))
    async with live.client("acme") as acme, live.client("globex") as globex:
        with pytest.raises(AttestationError) as err:
            await acme.generate("no key for a shared worker", model="echo")
        assert err.value.reason == "ATTESTATION_MEASUREMENT"
        assert (await globex.generate("globex still shares", model="echo")).text == "globex still shares"


async def _reloaded(live: LiveStack, before: int) -> None:
    end = time.monotonic() + 30
    while len(live.audit_records(event="policy_reload", result="accepted")) <= before:
        assert time.monotonic() < end, "the policy was not reloaded"
        await asyncio.sleep(0.1)


async def test_withdrawing_the_opt_in_fails_that_tenant_closed(make_stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    policy = shared_policy(tmp_path / "policy")
    live: LiveStack = make_stack(stack_toml(policy))
    async with live.client("acme") as acme, live.client("globex") as globex:
        assert (await globex.generate("while opted in", model="echo")).text == "while opted in"
        assert "echo" in await globex.list_models()
        before = len(live.audit_records(event="policy_reload", result="accepted"))
        tmp = policy / "tenants.toml.tmp"
        tmp.write_text(TENANTS_TOML.format(acme="shared", globex="dedicated"))
        tmp.replace(policy / "tenants.toml")  # the security team withdraws globex's opt-in
        await _reloaded(live, before)
        with pytest.raises(AttestationError) as err:
            await globex.generate("never reaches the shared worker", model="echo")
        assert err.value.reason == "ISOLATION_NOT_ALLOWED"
        with pytest.raises(AttestationError):
            await globex.generate("nor streams", model="slow")
        with pytest.raises(grpc.aio.AioRpcError) as refused_evidence:  # nor its evidence (end to end)
            await evidence(live, "globex")
        assert refused_evidence.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "echo" not in await globex.list_models()  # what it may not use is not listed either
        assert (await acme.generate("acme still shares", model="echo")).text == "acme still shares"
    [refused] = live.audit_records(event="isolation", request_id=err.value.request_id)
    assert refused["tenant"] == "globex" and refused["reason"] == "ISOLATION_NOT_ALLOWED"
    assert refused["decision"] == "refused"


async def test_a_tenant_never_opted_in_gets_no_key_from_a_shared_worker(make_stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    policy = shared_policy(tmp_path / "policy", globex="dedicated")
    live: LiveStack = make_stack(stack_toml(policy))
    async with live.client("globex") as globex, live.client("acme") as acme:
        with pytest.raises(AttestationError) as err:
            await globex.generate("refused", model="echo")
        assert err.value.reason == "ISOLATION_NOT_ALLOWED"
        assert (await acme.generate("fine", model="echo")).text == "fine"
    assert not live.audit_records(event="key_release", tenant="globex", request_id=err.value.request_id)


async def test_killing_the_shared_worker_mid_stream_fails_both_tenants_then_it_comes_back(
    make_stack: Callable[[str], LiveStack], tmp_path: Path
) -> None:
    live = make_stack(stack_toml(shared_policy(tmp_path / "policy")))
    key = ("shared", "slow")
    victim = live.stack.workers[key]
    domain = live.stack.domains[key]
    words = " ".join(f"w{i}" for i in range(60))
    async with (
        live.client("acme") as acme,
        live.client("globex") as globex,
        live.client("initech") as initech,
    ):
        streams = [
            acme.stream(words, model="slow", max_tokens=60),
            globex.stream(words, model="slow", max_tokens=60),
        ]
        for stream in streams:
            await stream.__anext__()
        os.kill(victim.process.pid, signal.SIGKILL)
        started = time.monotonic()

        async def drain(stream: Any) -> None:
            async for _ in stream:
                pass

        results = await asyncio.gather(*(drain(s) for s in streams), return_exceptions=True)
        # "Quickly": bounded generously because the test machine is shared and noisy.
        assert time.monotonic() - started < 3.0
        assert all(isinstance(r, UnavailableError) for r in results), results
        # The dedicated tenant's worker is untouched.
        assert (await initech.generate("untouched", model="echo")).text == "untouched"

        end = time.monotonic() + 60
        while live.stack.workers[key] is victim or not live.stack.workers[key].info:
            assert time.monotonic() < end, "the shared worker was not restarted"
            await asyncio.sleep(0.05)
        restarted = live.stack.workers[key]
        assert restarted.port == victim.port and restarted.process.pid != victim.process.pid
        for client, tenant in ((acme, "acme"), (globex, "globex")):
            assert await _generate_when_back(client, f"{tenant} back") == f"{tenant} back"
    path = live.config.state_dir / "audit" / "supervisor.jsonl"
    events = [json.loads(line) for line in path.read_text().splitlines()]
    kinds = [r["event"] for r in events if r.get("domain") == domain.id]
    crash = kinds.index("worker_exit")
    assert kinds[crash : crash + 3] == ["worker_exit", "domain_scrub", "worker_restart"]
    scrub = [r for r in events if r.get("domain") == domain.id][crash + 1]
    assert scrub["phase"] == "crash" and scrub["verified"] is True and scrub["canary_hits"] == 0


async def _generate_when_back(client: AsyncClient, text: str) -> str:
    end = time.monotonic() + 30
    while True:
        try:
            return (await client.generate(text, model="slow", timeout=10)).text
        except UnavailableError:
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.1)


MODEL_TOML = """
[gateway]
max_tokens = 512

[models.smollm2]
engine = "transformers"
path = "bundled"

[tenants.acme]
models = ["smollm2"]
isolation = "shared"

[tenants.globex]
models = ["smollm2"]
isolation = "shared"

[tenants.initech]
models = ["smollm2"]

[supervisor]
scrub = "off"
"""


async def test_the_bundled_model_on_one_shared_worker(make_stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Two tenants share one real-model worker; with scrub "off" for dedicated workers the shared one
    still zeroes between tenants (it runs with "tenant-switch", and zeroes each request's KV)."""
    live: LiveStack = make_stack(stack_toml(shared_policy(tmp_path / "policy"), MODEL_TOML))
    shared = live.stack.workers[("shared", "smollm2")]
    assert set(live.stack.workers) == {("shared", "smollm2"), ("initech", "smollm2")}
    argv = Path(f"/proc/{shared.process.pid}/cmdline").read_bytes().split(b"\0")
    settings = WorkerSettings.load(Path(argv[argv.index(b"--settings") + 1].decode()))
    assert settings.domain.scrub == "tenant-switch" and settings.tenant_names == ("acme", "globex")
    answers = {}
    for tenant in ("acme", "globex"):
        async with live.client(tenant) as client:
            answers[tenant] = await client.generate("Name a colour.", model="smollm2", max_tokens=8,
                                                    temperature=0.0)  # fmt: skip
    assert all(a.text.strip() and a.completion_tokens > 0 for a in answers.values())
    assert answers["acme"].text == answers["globex"].text  # same model, same greedy answer, per tenant
    assert (await live.worker_info("shared", "smollm2")).requests_started == 2
